"""`unipeft bench`: several methods on one task with the same budget, as a results table and a plot.

Each method trains in its own `unipeft train` process (so each peak-memory figure is that run's alone) with
the same options, into <output-dir>/<method>/. The table is written as bench.md and bench.json, the plot of
the test metric against the trainable share of parameters as bench.png.
"""
from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
import time
from typing import Callable

from .errors import UsageError

COLUMNS = ("method", "metric", "validation", "test", "trainable_params", "trainable_percent", "train_seconds",
           "peak_memory_mb")


def _row(method: str, folder: str, proc: subprocess.CompletedProcess) -> dict:
    if proc.returncode != 0:
        lines = [line for line in proc.stderr.strip().splitlines() if line.strip()]
        return {"method": method, "error": lines[-1] if lines else f"exit code {proc.returncode}"}
    with open(os.path.join(folder, "metrics.json"), encoding="utf-8") as fh:
        m = json.load(fh)
    main = m["main_metric"]
    return {"method": method, "metric": main, "validation": m["validation"][main], "test": m["test"][main],
            "trainable_params": m["trainable_params"], "trainable_percent": m["trainable_percent"],
            "train_seconds": m["train_seconds"], "peak_memory_mb": m["peak_memory_mb"], "task": m["task"],
            "model": m["model"], "steps": m["steps"], "device": m["device"]}


def machine() -> str:
    import torch

    cpus = os.cpu_count()
    gpu = f", {torch.cuda.get_device_name()}" if torch.cuda.is_available() else ""
    return (f"{platform.system()} {platform.machine()}, {cpus} CPU core{'s' if cpus != 1 else ''}{gpu}, "
            f"Python {platform.python_version()}")


def markdown(rows: list[dict], title: str) -> str:
    out = [title, "", "| method | metric | validation | test | trainable params | trainable % | train time (s) | peak memory (MiB) |",
           "|---|---|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        if "error" in r:
            out.append(f"| {r['method']} | failed: {r['error'].replace('|', '/')} | | | | | | |")
            continue
        out.append(f"| {r['method']} | {r['metric']} | {r['validation']:.4f} | {r['test']:.4f} | "
                   f"{r['trainable_params']:,d} | {r['trainable_percent']:.4f} | {r['train_seconds']:.0f} | "
                   f"{'' if r['peak_memory_mb'] is None else format(r['peak_memory_mb'], '.0f')} |")
    return "\n".join(out) + "\n"


def plot(rows: list[dict], path: str) -> None:
    """Test metric against trainable % (log scale), one labelled point per method."""
    from .report import new_figure, save_figure

    done = [r for r in rows if "error" not in r]
    figure = new_figure()
    axes = figure.add_subplot(1, 1, 1)
    for r in done:
        axes.scatter(r["trainable_percent"], r["test"])
        axes.annotate(r["method"], (r["trainable_percent"], r["test"]), textcoords="offset points", xytext=(4, 4),
                      fontsize=8)
    axes.set_xscale("log")
    axes.set(xlabel="trainable parameters (% of the model)",
             ylabel=f"test {done[0]['metric']}" if done else "test metric")
    axes.grid(True, alpha=0.3)
    save_figure(figure, path)


def check_bench_options(methods: list[str], options, method_given: bool) -> None:
    """Refuse what would fail every run, before the first one starts: the options bench sets itself, bad values,
    an unknown task, a missing model folder or device, a method config that cannot be built, and local data files
    that cannot be read. `options` are the parsed training options; `method_given`: --method was among them."""
    import dataclasses

    from . import tasks
    from .methods import check_method, method_config
    from .model import resolve_model
    from .plan import plan_run
    from .run import load_run_data

    methods = [check_method(m) for m in methods]
    if len(set(methods)) != len(methods):
        raise UsageError(f"--methods names a method twice: {methods}")
    reserved = [flag for flag, given in (("--method", method_given), ("--output-dir", options.output_dir is not None),
                                         ("--resume", options.resume)) if given]
    if reserved:
        raise UsageError(f"bench chooses {', '.join(reserved)} itself; remove it from the training options")
    plan_run(options)
    tasks.task_for(options.task, options.data or options.train_file)
    resolve_model(options.model)
    for method in methods:
        method_config(dataclasses.replace(options, method=method), total_steps=options.epochs)
    if options.data or options.train_file or options.test_file:  # local files are quick to read; the Hub is not
        load_run_data(options)


def bench(methods: list[str], train_args: list[str], output_dir: str,
          log: Callable[[str], None] = print) -> list[dict]:
    """Train each method with `train_args` (the same for all) and write bench.md, bench.json and bench.png."""
    from ..atomic_files import atomic_write_text
    from .methods import check_method

    methods = [check_method(m) for m in methods]
    taken = [m for m in methods if os.path.exists(os.path.join(output_dir, m))]
    if taken:
        raise UsageError(f"{output_dir} already holds runs for {taken}; choose another --output-dir")
    rows = []
    for method in methods:
        folder = os.path.join(output_dir, method)
        log(f"bench: {method} ...")
        started = time.perf_counter()
        proc = subprocess.run([sys.executable, "-m", "unipeft", "train", *train_args, "--method", method,
                               "--output-dir", folder, "--no-progress"], capture_output=True, text=True)
        rows.append(_row(method, folder, proc))
        outcome = rows[-1].get("error") or f"test {rows[-1]['metric']} {rows[-1]['test']:.4f}"
        log(f"bench: {method}: {outcome} ({time.perf_counter() - started:.0f} s)")
    done = [r for r in rows if "error" not in r]
    title = (f"Methods on {done[0]['task']} with {done[0]['model']} ({done[0]['steps']} steps each; "
             f"{machine()}, {time.strftime('%Y-%m-%d')})") if done else "All methods failed"
    os.makedirs(output_dir, exist_ok=True)
    atomic_write_text(os.path.join(output_dir, "bench.md"), markdown(rows, title))
    atomic_write_text(os.path.join(output_dir, "bench.json"),
                      json.dumps({"title": title, "machine": machine(), "date": time.strftime("%Y-%m-%d"),
                                  "train_args": train_args, "rows": rows}, indent=2) + "\n")
    plot(rows, os.path.join(output_dir, "bench.png"))
    log(f"bench: wrote bench.md, bench.json and bench.png to {output_dir}")
    return rows
