"""`minfer medusa cost`: what one Medusa verify forward of T tokens costs against one plain decode step.

speedup ~= tokens per forward / (cost of a T-token verify step / cost of a 1-token step);
both timed on ``bench spec``'s code-edit context, plain and prepacked (docs/measuring.md).
"""
import torch

from minfer.bench.timing import interleaved


@torch.no_grad()
def verify_costs(model, heads, prompt_ids: list[int], sizes=(1, 4, 7), repeats: int = 30) -> dict[str, float]:
    """Median seconds of a plain decode step ("plain") and of a verify step of each size ("T=4", ...)."""
    from minfer.speculative.medusa import DEFAULT_TREE, base_and_head_logits, build_tree, last_hidden
    from minfer.kv import ContiguousKVCache
    from minfer.speculative.lookahead import TreeAttentionCache
    if any(not 1 <= T <= len(DEFAULT_TREE) + 1 for T in sizes):
        raise ValueError(f"sizes must lie in 1..{len(DEFAULT_TREE) + 1}, got {sizes}")
    P = len(prompt_ids)
    cache = ContiguousKVCache(model.cfg, 1, P + 32, dtype=torch.float32, device="cpu")
    model(torch.tensor([prompt_ids]), torch.arange(P)[None], kv_cache=cache, last_only=True)
    no_rows = torch.empty(0, dtype=torch.long)
    trees = {T: build_tree(DEFAULT_TREE[:T - 1]) for T in sizes}

    def plain():
        model(torch.tensor([[1]]), torch.tensor([[P]]), kv_cache=cache, last_only=True)
        cache.truncate(P)                            # forget the token: every round sees the same context

    def verify(tree):
        def run():
            with last_hidden(model) as hidden:
                T = len(tree.paths) + 1
                tc = TreeAttentionCache(cache, tree.mask)
                pos = torch.tensor([[P] + [P + d for d in tree.depth]])
                model(torch.ones(1, T, dtype=torch.long), pos, kv_cache=tc, logits_indices=no_rows)
                base_and_head_logits(model, heads, hidden[0][0], max(tree.max_depth, 1))
        return run

    fns = {"plain": plain, **{f"T={T}": verify(trees[T]) for T in sizes}}
    med = interleaved(fns, repeats=repeats, warmup=2, log=lambda s: None)          # each call timed
    return {k: v["s"] for k, v in med.items()}


def main(args) -> int:
    from minfer.bench.spec import TASKS
    from minfer.speculative.medusa import load_heads
    from minfer.kernels.onednn_linear import pack_linears
    from minfer.cli_args import set_threads
    from minfer.llm import LLM
    set_threads(args.threads)
    sizes = tuple(int(s) for s in args.sizes.split(",") if s.strip())
    llm = LLM(args.model, device="cpu", dtype="float32", prepack=False)
    heads = load_heads(args.heads_dir)
    tok = llm.tokenizer
    _, text, start = TASKS["code-edit"]
    prompt = tok.encode(tok.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True)
                        + start)
    plain_costs = verify_costs(llm.model, heads, prompt, sizes, args.repeats)
    pack_linears(llm.model)
    packed_costs = verify_costs(llm.model, heads, prompt, sizes, args.repeats)
    print(f"context {len(prompt)} tokens, {heads.num_heads} heads, threads {torch.get_num_threads()}, "
          f"{args.repeats} rounds, medians")
    for label, costs in (("F.linear", plain_costs), ("prepacked", packed_costs)):
        base = costs["plain"]
        print(f"{label:>10}  plain step {1e3 * base:7.2f} ms  " + "  ".join(
            f"verify {k} {1e3 * v:7.2f} ms ({v / base:.2f}x)" for k, v in costs.items() if k != "plain"))
    return 0
