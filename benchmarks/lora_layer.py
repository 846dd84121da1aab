"""One LoRA-wrapped layer in isolation: unipeft against Hugging Face PEFT and the bare frozen layer.

Shapes are those of benchmarks/lora_step.py:
  gpt2    x [1024, 768] through GPT-2's c_attn (Conv1D 768 -> 2304)   (batch 4 x 256 tokens)
  minilm  x [4096, 384] through BERT's query (Linear 384 -> 384)      (batch 32 x 128 tokens)

Per variant it times forward and forward + backward (x requires grad, as inside a model; LoRA A/B
trainable, base weight frozen), interleaving the variants rep by rep, and reports medians and paired
ratios. `unipeft` is the default single-adapter path (the fused base + LoRA autograd function);
`unipeft_general` is unipeft's general path for the same layer, base_layer(x) then add_delta. It also
checks that every variant computes the same output and gradients as the plain formula
x W^T + b + (alpha / r) (x A^T) B^T, and with --profile prints the aten ops of forward + backward.

Usage:  python benchmarks/lora_layer.py [--shape gpt2|minilm|all] [--reps 200] [--threads N] [--profile]
"""
from __future__ import annotations

import argparse
import json
import statistics
import time
import warnings
from pathlib import Path

import torch
import torch.nn as nn

SHAPES = {"gpt2": (1024, 768, 2304, "conv1d"), "minilm": (4096, 384, 384, "linear")}
R, ALPHA = 8, 16
HERE = Path(__file__).resolve().parent


def make_base(kind: str, d_in: int, d_out: int) -> nn.Module:
    torch.manual_seed(0)
    if kind == "conv1d":
        from transformers.pytorch_utils import Conv1D

        layer = Conv1D(d_out, d_in)
        nn.init.normal_(layer.weight, std=0.02)
        nn.init.normal_(layer.bias, std=0.02)
    else:
        layer = nn.Linear(d_in, d_out)
    return layer.requires_grad_(False)


def wrapped(lib: str, kind: str, d_in: int, d_out: int) -> nn.Module:
    """The library's LoRA layer around a fresh copy of the base layer, with nonzero A and B (shared seed)."""
    mod = __import__(lib)
    holder = nn.Module()
    holder.proj = make_base(kind, d_in, d_out)
    config = mod.LoraConfig(r=R, lora_alpha=ALPHA, lora_dropout=0.0, target_modules=["proj"],
                            fan_in_fan_out=kind == "conv1d")
    model = mod.get_peft_model(holder, config)
    layer = model.base_model.model.proj
    torch.manual_seed(1)
    with torch.no_grad():
        layer.lora_A["default"].weight.copy_(torch.randn(R, d_in) / d_in ** 0.5)
        layer.lora_B["default"].weight.copy_(torch.randn(d_out, R) * 0.02)
    return layer.train()


def reference(layer, kind: str, x: torch.Tensor) -> torch.Tensor:
    """The straightforward formula, for equivalence checks."""
    layer = getattr(layer, "layer", layer)
    base = layer.base_layer
    weight = base.weight.t() if kind == "conv1d" else base.weight  # [out, in]
    A, B = layer.lora_A["default"].weight, layer.lora_B["default"].weight
    return x @ weight.t() + base.bias + (ALPHA / R) * ((x @ A.t()) @ B.t())


def trainable(module: nn.Module) -> list[torch.Tensor]:
    return [p for p in module.parameters() if p.requires_grad]


def check(variants: dict, kind: str, x0: torch.Tensor, g: torch.Tensor) -> dict:
    ref_layer = variants["unipeft"]
    x = x0.clone().requires_grad_(True)
    ref = reference(ref_layer, kind, x)
    ref_grads = torch.autograd.grad(ref, [x, *trainable(ref_layer)], g)
    report = {}
    for name, layer in variants.items():
        if name == "base":
            continue
        x = x0.clone().requires_grad_(True)
        out = layer(x)
        grads = torch.autograd.grad(out, [x, *trainable(layer)], g)
        # dL/dA and dL/dB sum over all tokens and reach magnitudes in the thousands: compare them relatively
        diffs = [float((a - b).abs().max()) for a, b in zip(grads, ref_grads)]
        report[name] = {"out": float((out - ref).abs().max()), "grad_x": diffs[0],
                        "grad_AB_abs": max(diffs[1:]),
                        "grad_AB_rel": max(d / float(b.abs().max()) for d, b in zip(diffs[1:], ref_grads[1:]))}
    return report


def summary(values: list[float]) -> dict:
    q = statistics.quantiles(values, n=4, method="inclusive")
    return {"median": q[1], "p25": q[0], "p75": q[2], "min": min(values), "n": len(values)}


def time_variants(variants: dict, x0: torch.Tensor, g: torch.Tensor, reps: int, warmup: int) -> dict:
    x = x0.clone().requires_grad_(True)
    names = list(variants)
    fwd = {n: [] for n in names}
    total = {n: [] for n in names}
    for rep in range(warmup + reps):
        for n in names[rep % len(names):] + names[:rep % len(names)]:
            layer = variants[n]
            t0 = time.perf_counter()
            out = layer(x)
            t1 = time.perf_counter()
            out.backward(g)
            t2 = time.perf_counter()
            x.grad = None
            for p in trainable(layer):
                p.grad = None
            del out
            if rep >= warmup:
                fwd[n].append(t1 - t0)
                total[n].append(t2 - t0)
    res = {"forward_ms": {n: summary([1e3 * t for t in v]) for n, v in fwd.items()},
           "fwd_bwd_ms": {n: summary([1e3 * t for t in v]) for n, v in total.items()}}
    for key, series in (("forward", fwd), ("fwd_bwd", total)):
        for n in names:
            if n != "base":
                res[f"{key}_{n}_over_base"] = summary([a / b for a, b in zip(series[n], series["base"])])
        for n in names:
            if n not in ("base", "peft") and "peft" in series:
                res[f"{key}_{n}_over_peft"] = summary([a / b for a, b in zip(series[n], series["peft"])])
    return res


def profile(variants: dict, x0: torch.Tensor, g: torch.Tensor, rows: int) -> None:
    from torch.profiler import ProfilerActivity, profile as tprofile

    x = x0.clone().requires_grad_(True)
    for n, layer in variants.items():
        for _ in range(3):
            layer(x).backward(g)
        with tprofile(activities=[ProfilerActivity.CPU]) as prof:
            for _ in range(5):
                layer(x).backward(g)
        print(f"----- {n}: 5 x (forward + backward)")
        print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=rows))


class GeneralPath(nn.Module):
    """unipeft's general (unfused) forward for the same layer: base_layer(x), then add_delta."""

    def __init__(self, layer: nn.Module):
        super().__init__()
        self.layer = layer

    def forward(self, x):
        return self.layer.add_delta("default", x, self.layer.base_layer(x))


def build(shape: str, extra: dict | None = None) -> tuple[dict, str, torch.Tensor, torch.Tensor]:
    n, d_in, d_out, kind = SHAPES[shape]
    variants = {"base": make_base(kind, d_in, d_out), "unipeft": wrapped("unipeft", kind, d_in, d_out),
                "unipeft_general": GeneralPath(wrapped("unipeft", kind, d_in, d_out)),
                "peft": wrapped("peft", kind, d_in, d_out)}
    variants.update(extra or {})
    torch.manual_seed(2)
    return variants, kind, torch.randn(n, d_in), torch.randn(n, d_out)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", choices=[*SHAPES, "all"], default="all")
    ap.add_argument("--reps", type=int, default=200)
    ap.add_argument("--warmup", type=int, default=10)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--profile", action="store_true", help="print torch.profiler op tables too")
    ap.add_argument("--rows", type=int, default=12)
    ap.add_argument("--out", default=str(HERE / "results" / "lora_layer.json"))
    args = ap.parse_args()
    warnings.filterwarnings("ignore")
    if args.threads:
        torch.set_num_threads(args.threads)
    results = {"threads": torch.get_num_threads(), "shapes": {}}
    for shape in (list(SHAPES) if args.shape == "all" else [args.shape]):
        variants, kind, x0, g = build(shape)
        eq = check(variants, kind, x0, g)
        res = time_variants(variants, x0, g, args.reps, args.warmup)
        res["max_abs_diff_vs_formula"] = eq
        results["shapes"][shape] = res
        n, d_in, d_out, _ = SHAPES[shape]
        print(f"\n{shape}: x [{n}, {d_in}] through {kind} {d_in} -> {d_out}, LoRA r={R}  "
              f"(median ms [IQR], paired ratios; {args.reps} reps)")
        for key in ("forward_ms", "fwd_bwd_ms"):
            print(f"  {key:<11}" + "  ".join(f"{v}: {s['median']:.3f} [{s['p25']:.3f}-{s['p75']:.3f}]"
                                             for v, s in res[key].items()))
        for key, s in res.items():
            if "_over_" in key:
                print(f"  {key:<28} {s['median']:.3f} [{s['p25']:.3f}-{s['p75']:.3f}]")
        print("  max |diff| vs formula: " + ", ".join(
            f"{v}: out {d['out']:.1e} dx {d['grad_x']:.1e} dA,dB rel {d['grad_AB_rel']:.1e}" for v, d in eq.items()))
        if args.profile:
            profile(variants, x0, g, args.rows)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2))
    print(f"\nwrote {out}")


if __name__ == "__main__":
    main()
