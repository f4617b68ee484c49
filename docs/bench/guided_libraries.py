"""The measurement behind docs/guided.md's choice of grammar engine (run by hand, not by the tests).

Per-token mask cost and schema compile time of llguidance, xgrammar and outlines-core on SmolLM2's
49,152-token vocabulary, over the tokens of one conforming JSON answer, 5 repeats, one thread:

    pip install llguidance xgrammar outlines-core
    python docs/bench/guided_libraries.py          # prints one line per library
"""
import json, time, sys, statistics
import torch
torch.set_num_threads(1)
TOK = "weights/smollm2-135m-instruct/tokenizer.json"
from tokenizers import Tokenizer
hf = Tokenizer.from_file(TOK)
V = hf.get_vocab_size(with_added_tokens=True)
EOS = 2
SCHEMA = {"type": "object", "properties": {"name": {"type": "string"}, "age": {"type": "integer"},
          "admin": {"type": "boolean"}, "color": {"enum": ["red", "green", "blue"]},
          "tags": {"type": "array", "items": {"type": "string"}}},
          "required": ["name", "age", "admin", "color", "tags"], "additionalProperties": False}
TEXT = '{"name": "Ada Lovelace", "age": 36, "admin": true, "color": "green", "tags": ["math", "engines", "poetry"]}'
ids = hf.encode(TEXT, add_special_tokens=False).ids
print("vocab", V, "tokens in answer", len(ids))
res = {}

def run(name, setup, fill, advance):
    t = time.perf_counter(); st = setup(); tc = time.perf_counter() - t
    ts = []
    for rep in range(5):
      st = setup()
      for tok in ids:
        t = time.perf_counter(); fill(st); ts.append(time.perf_counter() - t)
        advance(st, tok)
    res[name] = dict(compile_ms=tc*1e3, mask_ms_median=statistics.median(ts)*1e3, mask_ms_mean=statistics.mean(ts)*1e3, mask_ms_max=max(ts)*1e3)
    print(name, {k: round(v, 3) for k, v in res[name].items()}, flush=True)

# llguidance
import llguidance, llguidance.torch as lt
TK = llguidance.LLTokenizer(hf.to_str(), n_vocab=V, eos_token=EOS)
def lg_setup():
    tk = TK
    m = llguidance.LLMatcher(tk, llguidance.LLMatcher.grammar_from_json_schema(SCHEMA, defaults={"whitespace_flexible": True}))
    assert not m.is_error(), m.get_error()
    return m, lt.allocate_token_bitmask(1, V)
def lg_fill(st): lt.fill_next_token_bitmask(st[0], st[1], 0)
def lg_adv(st, tok): assert st[0].consume_token(tok), st[0].get_error()
t = time.perf_counter(); llguidance.LLTokenizer(hf.to_str(), n_vocab=V, eos_token=EOS); print("llg tokenizer ms", (time.perf_counter()-t)*1e3)
run("llguidance", lg_setup, lg_fill, lg_adv)

# xgrammar
import xgrammar as xg
from transformers import PreTrainedTokenizerFast
ptf = PreTrainedTokenizerFast(tokenizer_file=TOK)
t = time.perf_counter(); info = xg.TokenizerInfo.from_huggingface(ptf, vocab_size=V); comp = xg.GrammarCompiler(info); print("xgr tokenizer ms", (time.perf_counter()-t)*1e3)
def xg_setup():
    cg = comp.compile_json_schema(json.dumps(SCHEMA), any_whitespace=True)
    return xg.GrammarMatcher(cg), xg.allocate_token_bitmask(1, V)
def xg_fill(st): st[0].fill_next_token_bitmask(st[1], 0)
def xg_adv(st, tok): assert st[0].accept_token(tok)
run("xgrammar", xg_setup, xg_fill, xg_adv)

# outlines-core
from outlines_core import Vocabulary, Index, Guide
from outlines_core.json_schema import build_regex_from_schema
def bytes_to_unicode():
    bs = list(range(ord("!"), ord("~")+1))+list(range(ord("¡"), ord("¬")+1))+list(range(ord("®"), ord("ÿ")+1))
    cs = bs[:]; n = 0
    for b in range(256):
        if b not in bs: bs.append(b); cs.append(256+n); n += 1
    return dict(zip(bs, map(chr, cs)))
dec = {c: b for b, c in bytes_to_unicode().items()}
vocab = {}
special = {2, 0, 1}
for i in range(V):
    s = hf.id_to_token(i)
    if i == EOS: continue
    try: b = bytes(dec[c] for c in s)
    except KeyError: b = s.encode()
    vocab.setdefault(b, []).append(i)
t = time.perf_counter(); voc = Vocabulary(EOS, vocab); print("outlines vocab ms", (time.perf_counter()-t)*1e3)
def oc_setup():
    rx = build_regex_from_schema(json.dumps(SCHEMA), r"[ ]?")
    return Guide(Index(rx, voc)), torch.zeros((V + 31)//32, dtype=torch.int32)
def oc_fill(st): st[0].write_mask_into(st[1].data_ptr(), st[1].numel(), 4)
def oc_adv(st, tok): st[0].advance(tok)
run("outlines_core", oc_setup, oc_fill, oc_adv)
