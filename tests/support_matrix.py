"""The README support matrices, rendered from what the property tests actually run.

    python tests/support_matrix.py           print the tables
    python tests/support_matrix.py --write   write them between the README's markers

LoRA (tests/test_lora_properties.py): a cell is ticked when it is in `families.MATRIX` and at least one
property test runs on it; the line under the table lists, per task type, the DESIGN.md section-4
properties every cell of that task passes. Prompt methods (tests/test_prompt_properties.py): each cell
lists the methods tested on it, and a second table gives, per method and task type, the properties every
such cell passes.
"""
from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import families as F  # noqa: E402

README = os.path.join(os.path.dirname(os.path.abspath(__file__)), os.pardir, "README.md")
START, END = "<!-- support-matrix:start -->", "<!-- support-matrix:end -->"
PROMPT_START, PROMPT_END = "<!-- prompt-matrix:start -->", "<!-- prompt-matrix:end -->"
BLOCK_START, BLOCK_END = "<!-- block-matrix:start -->", "<!-- block-matrix:end -->"
TASKS = ("SEQ_CLS", "TOKEN_CLS", "FEATURE_EXTRACTION", "CAUSAL_LM", "SEQ_2_SEQ_LM")
TEST_FILE = "tests/test_lora_properties.py"
PROMPT_METHODS = ("prompt", "ptuning", "prefix", "idpg")


def tested_cells(module_name: str, method: str | None) -> dict[tuple[str, str, str], set[int]]:
    """(method, family, task) -> DESIGN.md property numbers of the tests parametrized over that cell."""
    module = __import__(module_name)
    found: dict[tuple[str, str, str], set[int]] = {}
    for fn in vars(module).values():
        number = getattr(fn, "covers", None)
        if number is None or not callable(fn) or getattr(fn, "__module__", None) != module_name:
            continue
        for mark in getattr(fn, "pytestmark", []):
            if mark.name != "parametrize" or mark.args[0] not in ("family,task", "method,family,task"):
                continue
            for param in mark.args[1]:
                values = tuple(getattr(param, "values", param))
                cell = values if len(values) == 3 else (method, *values)
                found.setdefault(cell, set()).add(number)
    return found


def tested_properties() -> dict[tuple[str, str], set[int]]:
    """(family, task) -> DESIGN.md property numbers LoRA's tests check on that cell."""
    return {(f, t): numbers for (_, f, t), numbers in tested_cells("test_lora_properties", "lora").items()}


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


def _per_task(tested: dict, method: str) -> list[str]:
    """For each task type: the properties `method` passes on every tested cell of that task ("—" if none)."""
    out = []
    for task in TASKS:
        sets = [numbers for (m, _, t), numbers in tested.items() if m == method and t == task]
        out.append(_numbers(set.intersection(*sets)) if sets else "—")
    return out


def render_prompt_methods() -> str:
    tested = tested_cells("test_prompt_properties", None)
    header = "| family | " + " | ".join(f"`{t}`" for t in TASKS) + " |"
    lines = [header, "|---" * (len(TASKS) + 1) + "|"]
    for family in F.FAMILIES:
        marks = [", ".join(m for m in PROMPT_METHODS if (m, family, t) in tested) or "—" for t in TASKS]
        lines.append(f"| {family} | " + " | ".join(marks) + " |")
    lines += ["", "| method | " + " | ".join(f"`{t}`" for t in TASKS) + " |", "|---" * (len(TASKS) + 1) + "|"]
    for method in PROMPT_METHODS:
        lines.append(f"| {method} | " + " | ".join(_per_task(tested, method)) + " |")
    lines += [
        "",
        "First table: the prompt methods tested on each cell. Second table: the DESIGN.md §4 properties each "
        "method passes on every cell of that task type (numbers as above), from `tests/test_prompt_properties.py`; "
        "it also checks 8 (a mixed batch is refused with a clear error) per method and 11 (parameter counts) per family. "
        "IDPG's prompt against a hand computation, the PG and M-IDPG variants, PHM and a real MiniLM sentence "
        "encoder are tested in `tests/test_idpg.py`; PEFT interop for prompt, P-tuning and prefix tuning on GPT-2, "
        "BERT, T5 and Llama in `tests/test_prompt_interop_and_errors.py`.",
    ]
    return "\n".join(lines) + "\n"


def render_block_methods() -> str:
    import test_block_adapters as B

    tested = tested_cells("test_block_adapters", None)
    lines = ["| method | " + " | ".join(f"`{t}`" for t in TASKS) + " | families not tested |", "|---" * (len(TASKS) + 2) + "|"]
    for method in B.METHODS:
        per_task = _per_task(tested, method)
        untested = [f for f in F.FAMILIES if not any(m == method and fam == f for m, fam, _ in tested)]
        lines.append(f"| {method} | " + " | ".join(per_task) + f" | {', '.join(untested) or '—'} |")
    lines += [
        "",
        "The DESIGN.md §4 properties each method passes on every cell (family × task of the support matrix) of that "
        "task type, from `tests/test_block_adapters.py` (`dora` is `LoraConfig(use_dora=True)`, `loha`, `lokr`, `oft`, "
        "`adalora` are `LoHaConfig`, `LoKrConfig`, `OFTConfig`, `AdaLoraConfig`). Untested families: `mam` holds a prefix, which needs an "
        "attention that reads a cache (DeBERTa has none: refused with a clear error); `bitfit` needs biases (T5, "
        "Llama and Mistral have none: refused). Merging (5) for `ia3` and `bitfit` is tested per cell in "
        "`tests/test_ia3.py` and `tests/test_bitfit.py`, for the LoRA variants in `tests/test_dora.py`, "
        "`test_loha.py`, `test_lokr.py`, `test_oft.py` and `test_adalora.py` (PEFT interop there too); the "
        "other methods refuse to merge with a clear error, tested above. `mam` and `cross_attn` (a `UnifiedConfig` with the "
        "prefix as a separate attention branch and a sequential FFN adapter) are not the identity at init (their "
        "prefix is not zero); `mam` refuses mixed batches (8) like every prefix. Parameter counts (11) per preset on bert-base and "
        "GPT-2 (meta device). Every valid point of `UnifiedConfig` "
        "trains on every family in `tests/test_unified_space.py`.",
    ]
    return "\n".join(lines) + "\n"


BLOCKS = {(START, END): render, (PROMPT_START, PROMPT_END): render_prompt_methods,
          (BLOCK_START, BLOCK_END): render_block_methods}


def readme_block(markers=(START, END), path: str = README) -> str:
    with open(path, encoding="utf-8") as fh:
        text = fh.read()
    start, end = text.index(markers[0]) + len(markers[0]), text.index(markers[1])
    return text[start:end].strip("\n") + "\n"


def write(path: str = README) -> None:
    with open(path, encoding="utf-8") as fh:
        text = fh.read()
    for (first, last), rendering in BLOCKS.items():
        start, end = text.index(first) + len(first), text.index(last)
        text = text[:start] + "\n" + rendering() + text[end:]
    with open(path, "w", encoding="utf-8") as fh:
        fh.write(text)


if __name__ == "__main__":
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    if sys.argv[1:] == ["--write"]:
        write()
    elif sys.argv[1:]:
        sys.exit("usage: python tests/support_matrix.py [--write]")
    else:
        print(render() + "\n" + render_prompt_methods() + "\n" + render_block_methods(), end="")
