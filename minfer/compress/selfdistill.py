"""Self-distillation for Medusa heads (Cai et al. 2024, 3.2.2): train them on the base model's OWN greedy
answers to prompts from the corpus's training functions, a ``loss_mask`` on the generated tokens
(docs/compression.md)."""
import ast
import json
import random
import textwrap
import time
from dataclasses import dataclass
from pathlib import Path

from minfer.compress.common import log

CODE_PROMPT = "Here is a Python function:\n\n```python\n{code}\n```\n\n{instruction}"
CODE_START = "```python\n"     # bench spec's code-edit answer start

# name -> (instruction, answer start). {doc} is the first docstring line of ANOTHER training function,
# {name} another training function's name, {arg} one of this function's arguments.
TEMPLATES: dict[str, tuple[str, str]] = {
    "docstring": ("Repeat the function exactly, changing only its docstring to \"{doc}\"", CODE_START),
    "rename": ("Repeat the function exactly, changing only its name to `{name}`.", CODE_START),
    "rename-arg": ("Repeat the function exactly, changing only the name of the argument `{arg}` to `{arg}_value`.",
                   CODE_START),
    "type-hints": ("Add type hints to this function's arguments. Keep everything else the same.", CODE_START),
    "explain": ("Explain what this function does.", ""),
}
WEIGHTS = {"docstring": 3, "rename": 2, "rename-arg": 2, "type-hints": 2, "explain": 1}


@dataclass
class Function:
    path: str            # relative to the stdlib root
    name: str
    code: str            # dedented source, decorators excluded
    doc: str | None      # first docstring line
    args: list[str]


def extract_functions(split: str, min_lines: int = 5, max_lines: int = 30,
                      max_files: int | None = None) -> list[Function]:
    """Every (async) function / method of the split's files (the first ``max_files``) with
    min_lines..max_lines lines, in file order."""
    from minfer.compress.corpus import STDLIB, split_files
    out = []
    for path in split_files(split)[:max_files]:
        try:
            text = path.read_text(encoding="utf-8")
            tree = ast.parse(text)
        except (UnicodeDecodeError, SyntaxError, OSError, ValueError):
            continue
        lines = text.splitlines()
        for node in ast.walk(tree):
            is_def = isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef))
            if not is_def or not min_lines <= node.end_lineno - node.lineno + 1 <= max_lines:
                continue
            code = textwrap.dedent("\n".join(lines[node.lineno - 1:node.end_lineno]))
            if "\t" in code:
                continue
            doc = ast.get_docstring(node)
            args = [a.arg for a in node.args.args + node.args.kwonlyargs if a.arg not in ("self", "cls")]
            out.append(Function(path.relative_to(STDLIB).as_posix(), node.name, code,
                                doc.strip().splitlines()[0] if doc and doc.strip() else None, args))
    return out


def build_prompts(tokenizer, split: str, n: int, *, seed: int = 0, max_code_tokens: int = 200,
                  max_files: int | None = None) -> list[dict]:
    """n chat prompts (token ids + the recipe that made them) from ``split``'s functions, shuffled by
    seed; a function is used once until every one that fits max_code_tokens has been."""
    rng = random.Random(seed)
    funcs = extract_functions(split, max_files=max_files) if n else []
    rng.shuffle(funcs)
    fits: list[Function] = []
    for f in funcs:                                  # tokenize only as many as needed
        if len(tokenizer.encode(f.code)) <= max_code_tokens:
            fits.append(f)
            if len(fits) >= n:
                break
    if n and not fits:
        raise ValueError(f"no function of the {split} split fits max_code_tokens={max_code_tokens}")
    docs = [f.doc for f in funcs if f.doc and len(f.doc) < 80]
    names = [f.name for f in funcs]
    kinds = [k for k, w in WEIGHTS.items() for _ in range(w)]
    out = []
    for i in range(n):
        f = fits[i % len(fits)]
        kind = rng.choice(kinds)
        if kind == "rename-arg" and not f.args:
            kind = "docstring"
        instruction, start = TEMPLATES[kind]
        instruction = instruction.format(doc=rng.choice(docs) if docs else "Do the work.",
                                         name=rng.choice(names), arg=rng.choice(f.args) if f.args else "")
        text = tokenizer.apply_chat_template(
            [{"role": "user", "content": CODE_PROMPT.format(code=f.code, instruction=instruction)}],
            add_generation_prompt=True) + start
        out.append({"split": split, "template": kind, "path": f.path, "function": f.name,
                    "prompt_ids": tokenizer.encode(text)})
    return out


def generate_answers(llm, prompts: list[dict], *, max_tokens: int, minutes: float | None = None,
                     batch: int = 8, desc: str = "generate") -> list[dict]:
    """Greedy answers through ``LLM.generate``, ``batch`` prompts per call, until the prompts or the
    minutes run out (a call that starts in time finishes). Adds ``answer_ids`` to each prompt dict."""
    from tqdm.auto import tqdm

    from minfer.sampling import SamplingParams
    params = SamplingParams(temperature=0.0, max_tokens=max_tokens)
    t0, done, new_tokens = time.perf_counter(), [], 0
    with tqdm(total=len(prompts), desc=desc, unit="ex") as bar:
        for i in range(0, len(prompts), batch):
            if minutes is not None and time.perf_counter() - t0 >= 60 * minutes:
                break
            chunk = prompts[i:i + batch]
            outs = llm.generate([p["prompt_ids"] for p in chunk], params)
            for p, o in zip(chunk, outs):
                done.append({**p, "answer_ids": list(o.outputs[0].token_ids)})
                new_tokens += len(o.outputs[0].token_ids)
            bar.update(len(chunk))
            bar.set_postfix(gen_tok_s=f"{new_tokens / (time.perf_counter() - t0):.1f}")
    return done


def rows_and_mask(examples: list[dict], seq_len: int, pad_id: int) -> tuple[list[int], list[int], int]:
    """One example per row of seq_len: prompt + answer, padded; mask 1 on the answer only
    -> (flat token ids, flat mask, number of examples dropped because they do not fit)."""
    ids, mask, dropped = [], [], 0
    for ex in examples:
        p, a = ex["prompt_ids"], ex["answer_ids"]
        if len(p) + len(a) > seq_len or not a:
            dropped += 1
            continue
        pad = seq_len - len(p) - len(a)
        ids += p + a + [pad_id] * pad
        mask += [0] * len(p) + [1] * len(a) + [0] * pad
    return ids, mask, dropped


def selfdistill(llm, data_dir: str | Path, *, minutes_generate: float, max_examples: int = 2000,
                heldout_examples: int = 16, max_tokens: int = 128, batch: int = 8, seq_len: int = 384,
                seed: int = 0, k: int = 32, progress: bool = True, max_files: int | None = None) -> dict[str, Path]:
    """Prompts, greedy answers (saved as data_dir/examples_{split}.json, reused when there), and teacher
    caches under data_dir/{heldout,train} (resumed after a kill) -> the cache folders."""
    from minfer.atomic import write_json
    from minfer.compress.corpus import split_fingerprint
    from minfer.compress.teacher import build_teacher_cache
    data = Path(data_dir)
    pad_id = (llm.tokenizer.eos_token_ids or [0])[0]
    t0, caches = time.perf_counter(), {}
    for split, n in (("heldout", heldout_examples), ("train", max_examples)):
        path = data / f"examples_{split}.json"
        if path.is_file():
            examples = json.loads(path.read_text())["examples"]
            log(f"{split}: reusing {len(examples)} answers from {path}")
        else:
            prompts = build_prompts(llm.tokenizer, split, n, seed=seed, max_files=max_files)
            left = None if split == "heldout" else max(0.0, minutes_generate - (time.perf_counter() - t0) / 60)
            examples = generate_answers(llm, prompts, max_tokens=max_tokens, minutes=left, batch=batch,
                                        desc=f"answers ({split})")
            write_json(path, {"split": split, "templates": TEMPLATES, "weights": WEIGHTS, "seed": seed,
                              "max_tokens": max_tokens, "model": llm.model_name, "corpus": split_fingerprint(),
                              "examples": examples})
        ids, mask, dropped = rows_and_mask(examples, seq_len, pad_id)
        if not ids:
            raise ValueError(f"{split}: no answer fits seq_len={seq_len} (generated {len(examples)})")
        log(f"{split}: {len(examples)} examples, {dropped} longer than seq_len={seq_len} dropped, "
            f"{sum(mask)} answer tokens in {len(ids) // seq_len} rows")
        caches[split] = build_teacher_cache(
            llm.model, ids, data / split, seq_len=seq_len, k=k, shard_seqs=8, batch=2, loss_mask=mask,
            meta={"model": llm.model_name, "split": split, "selfdistill": True, "examples": len(ids) // seq_len},
            progress=progress)
    return caches
