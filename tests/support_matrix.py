"""The README support matrix, rendered from what tests/test_lora_properties.py actually runs.

    python tests/support_matrix.py           print the table
    python tests/support_matrix.py --write   write it between the README's support-matrix markers

A cell is ticked when it is in `families.MATRIX` and at least one property test runs on it; the line
under the table lists, per task type, the DESIGN.md section-4 properties every cell of that task passes.
"""
from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import families as F  # noqa: E402

README = os.path.join(os.path.dirname(os.path.abspath(__file__)), os.pardir, "README.md")
START, END = "<!-- support-matrix:start -->", "<!-- support-matrix:end -->"
TASKS = ("SEQ_CLS", "TOKEN_CLS", "FEATURE_EXTRACTION", "CAUSAL_LM", "SEQ_2_SEQ_LM")
TEST_FILE = "tests/test_lora_properties.py"


def tested_properties() -> dict[tuple[str, str], set[int]]:
    """(family, task) -> DESIGN.md property numbers of the tests parametrized over that cell."""
    import test_lora_properties as t

    found: dict[tuple[str, str], set[int]] = {}
    for fn in vars(t).values():
        number = getattr(fn, "covers", None)
        if number is None or not callable(fn):
            continue
        for mark in getattr(fn, "pytestmark", []):
            if mark.name == "parametrize" and mark.args[0] == "family,task":
                for param in mark.args[1]:
                    found.setdefault(tuple(param.values), set()).add(number)
    return found


def _numbers(numbers: set[int]) -> str:
    """1, 2, 3, 5 -> '1–3, 5'."""
    runs, ordered = [], sorted(numbers)
    for n in ordered:
        if runs and n == runs[-1][1] + 1:
            runs[-1][1] = n
        else:
            runs.append([n, n])
    return ", ".join(f"{a}" if a == b else f"{a}–{b}" for a, b in runs)


def render() -> str:
    tested = tested_properties()
    supported = set(F.MATRIX)
    lines = ["| family | " + " | ".join(f"`{t}`" for t in TASKS) + " |", "|---" * (len(TASKS) + 1) + "|"]
    for family in F.FAMILIES:
        marks = ["✓" if (family, t) in supported and tested.get((family, t)) else "—" for t in TASKS]
        lines.append(f"| {family} | " + " | ".join(marks) + " |")
    per_task = []
    for task in TASKS:
        sets = [tested[c] for c in F.MATRIX if c[1] == task and c in tested]
        if sets:
            per_task.append(f"`{task}` {_numbers(set.intersection(*sets))}")
    lines += [
        "",
        f"✓ = LoRA (family default targets) passes, on every ticked cell of that column, the DESIGN.md §4 "
        f"properties tested by `{TEST_FILE}`: " + "; ".join(per_task) + ". "
        "(1 frozen base / only adapters train, 2 identity at init, 3 loss decreases, 4 save/load, "
        "5 merge/unmerge/safe_merge, 6 disable_adapter, 7 two adapters, 8 mixed batch, "
        "9 generate greedy/beam with and without cache, 10 bf16, 11 trainable-parameter formula.) "
        "Property 12 (bad input raises a clear error before the model changes) is tested family-independently "
        "in `tests/test_bad_input.py`; checkpoint interop with Hugging Face PEFT, both ways, for every family "
        "in `tests/test_interop_peft.py`.",
    ]
    return "\n".join(lines) + "\n"


def readme_block(path: str = README) -> str:
    with open(path, encoding="utf-8") as fh:
        text = fh.read()
    start, end = text.index(START) + len(START), text.index(END)
    return text[start:end].strip("\n") + "\n"


def write(path: str = README) -> None:
    with open(path, encoding="utf-8") as fh:
        text = fh.read()
    start, end = text.index(START) + len(START), text.index(END)
    with open(path, "w", encoding="utf-8") as fh:
        fh.write(text[:start] + "\n" + render() + text[end:])


if __name__ == "__main__":
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    if sys.argv[1:] == ["--write"]:
        write()
    elif sys.argv[1:]:
        sys.exit("usage: python tests/support_matrix.py [--write]")
    else:
        print(render(), end="")
