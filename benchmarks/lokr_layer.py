"""One LoKr-adapted nn.Linear (r=8, alpha=16, PEFT's factorisation), forward + backward: unipeft against HF PEFT.

HF PEFT forms the out × in matrix kron(W1, W2) and multiplies every token by it; unipeft applies W1 X W2ᵀ to each
token viewed as a matrix X, so its cost grows with in·(a + b) per token instead of in·out. This measures where
that pays: square layers of 384 (MiniLM), 1024 and 4096 (Llama-7B) features. Runs are interleaved per round;
ratios are medians of per-round paired ratios. Outputs and input gradients are checked equal first.

Usage:  python benchmarks/lokr_layer.py [--threads 1] [--reps 10] [--out benchmarks/results/lokr_layer.json]
"""
from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch
import torch.nn as nn

SIZES = ((384, 4096), (1024, 2048), (4096, 1024))  # (features, tokens)


def adapted(lib, dim: int):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(dim, dim)).requires_grad_(False)
    return lib.get_peft_model(model, lib.LoKrConfig(r=8, alpha=16, target_modules=["0"], init_weights=False))


def step(model, x) -> float:
    x.grad = None
    t0 = time.perf_counter()
    model(x).sum().backward()
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--reps", type=int, default=10)
    ap.add_argument("--out", default=str(Path(__file__).resolve().parent / "results" / "lokr_layer.json"))
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    import peft
    import unipeft

    results = {"threads": args.threads, "reps": args.reps, "torch": torch.__version__, "peft": peft.__version__, "sizes": {}}
    for dim, tokens in SIZES:
        models = {"unipeft": adapted(unipeft, dim), "peft": adapted(peft, dim)}
        x = torch.randn(tokens, dim, requires_grad=True)
        outs = {}
        for lib, model in models.items():
            out = model(x)
            out.sum().backward()
            outs[lib] = (out.detach(), x.grad.clone())
            x.grad = None
        torch.testing.assert_close(outs["unipeft"][0], outs["peft"][0], rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(outs["unipeft"][1], outs["peft"][1], rtol=1e-4, atol=1e-4)
        times = {lib: [] for lib in models}
        for rnd in range(args.reps + 2):
            for lib in (list(models) if rnd % 2 else list(models)[::-1]):
                dt = step(models[lib], x)
                if rnd >= 2:
                    times[lib].append(dt)
        ratios = sorted(a / b for a, b in zip(times["unipeft"], times["peft"]))
        q = statistics.quantiles(ratios, n=4, method="inclusive")
        results["sizes"][f"{dim}x{tokens}"] = {
            "ms": {lib: 1e3 * statistics.median(t) for lib, t in times.items()},
            "ratio_unipeft_over_peft": {"median": q[1], "p25": q[0], "p75": q[2]}, "raw_s": times}
        r = results["sizes"][f"{dim}x{tokens}"]
        print(f"{dim:>5} features, {tokens:>5} tokens: unipeft {r['ms']['unipeft']:8.1f} ms, peft {r['ms']['peft']:8.1f} ms, "
              f"unipeft/peft {q[1]:.3f} [{q[0]:.3f}-{q[2]:.3f}]", flush=True)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(results, indent=2))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
