#!/usr/bin/env bash
# The GPU lane, as one prepared script: run it from the repository root on a machine with a CUDA GPU.
#
#   bash scripts/gpu_check.sh            # results land in $OUT (default gpu_results/)
#
# What it does, in order (each step logs to $OUT and the script goes on if one fails):
#   1. records the GPU, driver, torch and triton versions;
#   2. `pytest -m gpu`: the CUDA tests (Triton kernel vs reference, ...);
#   3. writes random-weight folders in two real shapes (no download is possible on a lent machine):
#      SmolLM2-135M (fp32) and the Llama-3.2-1B body with SmolLM2's vocabulary (bf16);
#   4. benchmarks: batch-1 decode (minfer cached and static (one CUDA graph), the engine eager / CUDA graphs / torch.compile, and
#      transformers eager / static cache compiled), continuous batching at 32 requests on CUDA graphs
#      vs transformers' padded generate, and decode attention incl. the Triton paged kernel.
#
# On the device tool's H200 (no registry there): minfer's one missing dependency, gguf, travels as a
# wheel. Once, here: `echo /.whl/ >> .git/info/exclude` and
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 -d .whl gguf
# then run with carry [".whl", "weights/smollm2-135m-instruct/tokenizer.json",
# "weights/smollm2-135m-instruct/tokenizer_config.json"] and command `bash scripts/gpu_check.sh`.
#
# PART=1 (machine, tests, batch-1 decode) and PART=2 (serving, compile, attention) split the lane in
# two commands of under 10 minutes each, as the device tool needs; PART=all (default) runs both.
set -uo pipefail
PART=${PART:-all}
OUT=${OUT:-gpu_results}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
PY=${PYTHON:-python3}
if [ -d .whl ] && ls .whl/*.whl >/dev/null 2>&1; then
  $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH=/tmp/site:$PWD
else
  export PYTHONPATH=$PWD
fi
TOK=${TOKENIZER_FROM:-weights/smollm2-135m-instruct}
W=${WEIGHTS_TMP:-/tmp/minfer-random}
step() { echo "== $*" | tee -a "$OUT/steps.log"; }

part() { [ "$PART" = all ] || [ "$PART" = "$1" ]; }

step "machine"
{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
  $PY -c "import torch, triton; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'triton', triton.__version__)"
  date -u +%Y-%m-%dT%H:%MZ; } 2>&1 | tee "$OUT/machine.txt"

if part 1; then
step "pytest -m gpu"
timeout 240 $PY -m pytest -m gpu -q -p no:cacheprovider tests 2>&1 | tail -n 30 | tee "$OUT/pytest_gpu.log"

fi

step "random weights"
$PY -m minfer.bench.random_weights "$W/smollm2-135m" --shape smollm2-135m --tokenizer-from "$TOK" 2>&1 | tee -a "$OUT/steps.log"
$PY -m minfer.bench.random_weights "$W/llama-1b-body" --shape llama-3.2-1b-body --tokenizer-from "$TOK" 2>&1 | tee -a "$OUT/steps.log"

if part 1; then
step "bench decode: SmolLM2 shape, fp32 (eager, CUDA graphs)"
timeout 180 $PY -m minfer.cli bench decode --model "$W/smollm2-135m" --device cuda --dtype float32 \
  --methods cached,static,llm,llm-graphs,transformers --max-tokens 256 --repeats 3 --no-kv-quality \
  --json "$OUT/decode_smollm2.json" 2>&1 | tail -n 20
step "bench decode: Llama-3.2-1B body, bf16 (eager, CUDA graphs)"
timeout 180 $PY -m minfer.cli bench decode --model "$W/llama-1b-body" --device cuda --dtype bfloat16 \
  --methods cached,static,llm,llm-graphs,transformers --max-tokens 256 --repeats 3 --no-kv-quality \
  --json "$OUT/decode_1b.json" 2>&1 | tail -n 20
fi
if part 2; then
step "bench serve: 32 requests, Llama-3.2-1B body, bf16 (CUDA graphs; eager with --enforce-eager)"
timeout 240 $PY -m minfer.cli bench serve --model "$W/llama-1b-body" --device cuda --dtype bfloat16 \
  --policy continuous --rate inf --dataset random --baselines transformers --out-dir "$OUT" 2>&1 | tail -n 20
step "bench decode: SmolLM2 shape, fp32, compiled (minfer compile=True vs transformers' compiled static cache)"
timeout 300 $PY -m minfer.cli bench decode --model "$W/smollm2-135m" --device cuda --dtype float32 \
  --methods llm,llm-compile,transformers-compiled --max-tokens 256 --repeats 3 --no-kv-quality \
  --json "$OUT/decode_smollm2_compile.json" 2>&1 | tail -n 20
step "bench attention (incl. the Triton paged kernel)"
timeout 120 $PY -m minfer.cli bench attention --model "$W/smollm2-135m" --device cuda --batch 1,8,32 \
  --context 256,1024,4096 --repeats 5 --json "$OUT/attention.json" 2>&1 | tail -n 20
fi
step "done"
