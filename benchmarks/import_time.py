"""Import time: `import unipeft` (and touching unipeft.LoraConfig) against `import peft`, fresh processes.

Each sample is a new interpreter, so nothing is cached in-process (the OS file cache is warm after the
first runs, as in everyday use). The libraries alternate run by run, the order rotating each round.
Two numbers per sample:
  in-process  seconds from just before the import statement to just after touching LoraConfig
  process     wall time of the whole `python -c ...` subprocess, interpreter start-up included
`torch` alone is timed too, for reference: both libraries need it once LoraConfig is touched.

Usage:  python benchmarks/import_time.py [--runs 15] [--out benchmarks/results/import_time.json]
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

TARGETS = {
    "unipeft": "import unipeft; unipeft.LoraConfig",
    "unipeft (bare import)": "import unipeft",
    "peft": "import peft; peft.LoraConfig",
    "torch": "import torch",
}
HERE = Path(__file__).resolve().parent


def one_run(stmt: str) -> tuple[float, float]:
    code = ("import time; t0 = time.perf_counter(); " + stmt +
            "; print(repr(time.perf_counter() - t0))")
    env = dict(os.environ, PYTHONWARNINGS="ignore", TRANSFORMERS_VERBOSITY="error")
    t0 = time.perf_counter()
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env)
    wall = time.perf_counter() - t0
    if out.returncode:
        raise RuntimeError(f"{stmt!r} failed:\n{out.stderr[-2000:]}")
    return float(out.stdout.strip().splitlines()[-1]), wall


def summary(values: list[float]) -> dict:
    q = statistics.quantiles(values, n=4, method="inclusive") if len(values) > 1 else [values[0]] * 3
    return {"median": q[1], "p25": q[0], "p75": q[2], "min": min(values), "max": max(values), "n": len(values)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", type=int, default=15)
    ap.add_argument("--warmup", type=int, default=1, help="untimed rounds first (warms the file cache)")
    ap.add_argument("--out", default=str(HERE / "results" / "import_time.json"))
    args = ap.parse_args()

    names = list(TARGETS)
    inproc = {n: [] for n in names}
    wall = {n: [] for n in names}
    for rnd in range(args.warmup + args.runs):
        for n in names[rnd % len(names):] + names[:rnd % len(names)]:
            t_in, t_wall = one_run(TARGETS[n])
            if rnd >= args.warmup:
                inproc[n].append(t_in)
                wall[n].append(t_wall)
    uni, pef = "unipeft", "peft"
    ratios_in = [a / b for a, b in zip(inproc[uni], inproc[pef])]
    ratios_wall = [a / b for a, b in zip(wall[uni], wall[pef])]
    res = {"date": datetime.date.today().isoformat(), "python": sys.version.split()[0], "runs": args.runs,
           "statements": TARGETS, "in_process_s": {n: summary(v) for n, v in inproc.items()},
           "process_wall_s": {n: summary(v) for n, v in wall.items()},
           "ratio_unipeft_over_peft_in_process": summary(ratios_in),
           "ratio_unipeft_over_peft_process_wall": summary(ratios_wall),
           "loadavg": os.getloadavg()}
    print(f"import time, {args.runs} fresh processes each (median seconds [IQR])")
    print(f"{'target':<24}{'in-process':>26}{'whole process':>26}")
    for n in names:
        a, b = res["in_process_s"][n], res["process_wall_s"][n]
        print(f"{n:<24}{a['median']:>10.3f} [{a['p25']:.3f}-{a['p75']:.3f}]"
              f"{b['median']:>10.3f} [{b['p25']:.3f}-{b['p75']:.3f}]")
    for key, label in (("ratio_unipeft_over_peft_in_process", "in-process"),
                       ("ratio_unipeft_over_peft_process_wall", "whole process")):
        r = res[key]
        print(f"unipeft/peft ({label}): {r['median']:.3f} [{r['p25']:.3f}-{r['p75']:.3f}] (paired per round)")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(res, indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
