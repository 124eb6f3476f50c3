"""``accllm demo``: the main job on the embedded default model (what `make demo` runs)."""
from __future__ import annotations

import time

DESCRIPTION = """The main job on the embedded default model: load SmolLM2-135M, measure its WikiText-2
perplexity (16 chunks x 1024 tokens of test) and print a short greedy continuation of a prompt."""
EPILOG = None


def add_arguments(p) -> None:
    p.add_argument("--model", default="smollm2-135m", help="model (default %(default)s)")
    p.add_argument("--prompt", default="The capital of France is", help="prompt for the continuation")
    p.add_argument("--max-new-tokens", type=int, default=24)
    p.add_argument("--chunks", type=int, default=16, help="perplexity chunks of 1024 tokens (default 16)")
    p.add_argument("--no-progress", action="store_true")


def greedy_continuation(loaded, prompt: str, max_new_tokens: int) -> str:
    import torch
    tok = loaded.tokenizer
    ids = tok(prompt, return_tensors="pt", add_special_tokens=False)["input_ids"]
    with torch.no_grad():
        out = loaded.model.generate(ids, max_new_tokens=max_new_tokens, do_sample=False,
                                    pad_token_id=tok.eos_token_id)
    return tok.decode(out[0, ids.shape[1]:], skip_special_tokens=True)


def run(args) -> int:
    from algo.data import load_tokens
    from algo.eval import HFScorer, format_table, perplexity_chunks
    from algo.models import load_model

    t0 = time.time()
    print(f"[1/3] loading {args.model}", flush=True)
    loaded = load_model(args.model)
    t_load = time.time() - t0
    print(f"[2/3] perplexity on WikiText-2 test ({args.chunks} x 1024 tokens)", flush=True)
    tokens = load_tokens("wikitext2", loaded.tokenizer, 1024 * args.chunks)
    res = perplexity_chunks(HFScorer(loaded.model, name=args.model), tokens, 1024, args.chunks,
                            progress=not args.no_progress)
    print(f"[3/3] greedy continuation of {args.prompt!r}", flush=True)
    t1 = time.time()
    text = greedy_continuation(loaded, args.prompt, args.max_new_tokens)
    print(f"\n{args.prompt}{text}\n")
    print(format_table([
        ("model", f"{args.model} ({loaded.config.num_hidden_layers} layers, "
                  f"{sum(p.numel() for p in loaded.model.parameters()) / 1e6:.0f}M parameters)"),
        ("perplexity", f"{res['ppl']:.3f}  (WikiText-2 test, ctx 1024, {args.chunks} chunks, SmolLM2 tokenizer)"),
        ("load / ppl / generate", f"{t_load:.1f} s / {res['seconds']:.1f} s / {time.time() - t1:.1f} s"),
    ]))
    return 0
