"""Bottleneck adapters, IA3 and BitFit against LoRA at (about) the same parameter budget: training-step time
in one process, interleaved, as ratios to unipeft's LoRA.

Budget per case: LoRA r=8 on the family's default targets (GPT-2: c_attn; MiniLM: query, value). A bottleneck
adapter on one site per block gets r=16 and Houlsby (two sites) r=8, which lands within 10% of LoRA's count
(printed). IA3 and BitFit have fixed, much smaller counts: they are listed for reference.

Per case it measures the training step (forward + backward + AdamW step over the trainable parameters),
median over --steps rounds after --warmup; every runner runs once per round, order rotated, and ratios
to LoRA are taken per round (paired). The floor is the frozen model's forward + backward to its inputs.

Usage:  python benchmarks/adapter_step.py [--case gpt2|minilm|all] [--steps 20] [--warmup 3] [--threads N]
"""
from __future__ import annotations

import argparse
import copy
import gc
import json
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from lora_step import CASES, HERE, Floor, Trainer, build_base, environment, fmt_ratio, paired_ratio, summary  # noqa: E402


def configs(case: str) -> dict:
    import unipeft as u

    task = CASES[case]["task_type"]
    return {
        "lora": u.LoraConfig(task_type=task, r=8, lora_alpha=16, target_modules=CASES[case]["targets"]),
        "houlsby": u.HoulsbyConfig(task_type=task, bottleneck_size=8),
        "pfeiffer": u.PfeifferConfig(task_type=task, bottleneck_size=16),
        "parallel": u.ParallelAdapterConfig(task_type=task, bottleneck_size=16),
        "scaled_parallel": u.ScaledParallelAdapterConfig(task_type=task, bottleneck_size=16),
        "ia3": u.IA3Config(task_type=task),
        "bitfit": u.BitFitConfig(task_type=task),
    }


def adapter_numel(model) -> int:
    """Trainable parameters outside the task head (the head is the same for every method)."""
    return sum(p.numel() for n, p in model.named_parameters() if p.requires_grad and ".modules_to_save." not in n)


def time_case(case: str, steps: int, warmup: int) -> dict:
    import torch

    import unipeft

    base, batch = build_base(case)
    runners, counts = {"floor": Floor(copy.deepcopy(base), batch)}, {}
    for name, config in configs(case).items():
        torch.manual_seed(1)
        model = unipeft.get_peft_model(copy.deepcopy(base), config)
        model.train()
        counts[name] = adapter_numel(model)
        runners[name] = Trainer(model, torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4), batch)
    del base
    gc.collect()
    names = list(runners)
    times = {n: [] for n in names}
    for rnd in range(warmup + steps):
        order = names[rnd % len(names):] + names[:rnd % len(names)]
        for n in order:
            torch.manual_seed(1000 + rnd)
            t0 = time.perf_counter()
            runners[n].step()
            if rnd >= warmup:
                times[n].append(time.perf_counter() - t0)
        print(f"  [{case}] round {rnd + 1}/{warmup + steps}", flush=True)
    return {"params": counts, "step_s": {n: summary(t) for n, t in times.items()},
            "ratio_over_lora": {n: paired_ratio(times[n], times["lora"]) for n in names if n != "lora"},
            "ratio_over_floor": {n: paired_ratio(times[n], times["floor"]) for n in names if n != "floor"}}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--case", choices=[*CASES, "all"], default="all")
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--out", default=str(HERE / "results" / "adapter_step.json"))
    args = ap.parse_args()
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    import warnings

    warnings.filterwarnings("ignore")
    results = {"environment": environment(args.threads), "settings": vars(args), "cases": {}}
    for case in (list(CASES) if args.case == "all" else [args.case]):
        results["cases"][case] = time_case(case, args.steps, args.warmup)
    results["environment"]["loadavg_end"] = os.getloadavg()
    print("\nTraining step, unipeft only (median s; ratios: medians of per-round paired ratios [IQR])")
    print(f"{'case':<8}{'method':<17}{'params':>10}{'step s':>9}  {'/ lora':<22}{'/ floor':<22}")
    for case, r in results["cases"].items():
        for name, count in r["params"].items():
            over_lora = fmt_ratio(r["ratio_over_lora"][name]) if name in r["ratio_over_lora"] else "1"
            print(f"{case:<8}{name:<17}{count:>10,d}{r['step_s'][name]['median']:>9.3f}  {over_lora:<22}"
                  f"{fmt_ratio(r['ratio_over_floor'][name]):<22}")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(results, indent=2))
    print(f"\nwrote {args.out}")


if __name__ == "__main__":
    main()
