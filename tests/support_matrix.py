"""The README support matrix, rendered from the capability table and what the property suite runs.

    python tests/support_matrix.py           print it
    python tests/test_readme_tables.py --write   write it (and the other generated tables) into the README

Every test of tests/test_properties.py is tagged with its DESIGN.md section-4 number and parametrized over
(method, family, task) cells drawn from tests/capabilities.py; a property is listed for a method and task type
when it is tested on every cell of that task the method supports (the suite passing is what makes it true).
"""
from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import families as F  # noqa: E402

START, END = "<!-- support-matrix:start -->", "<!-- support-matrix:end -->"
TASKS = ("SEQ_CLS", "TOKEN_CLS", "FEATURE_EXTRACTION", "CAUSAL_LM", "SEQ_2_SEQ_LM")
PROPERTIES = ("1 frozen base / only adapters train, 2 identity at init, 3 loss decreases, 4 save/load under any "
              "name, 5 merge/unmerge/safe_merge (or a clear refusal), 6 disable_adapter, 7 two adapters: load, "
              "switch, delete, 8 mixed batch (or a clear refusal), 9 generate greedy/beam with and without cache "
              "(and equal to the merged model, and per row of a mixed batch), 10 bf16, 11 trainable-parameter formula")


def tested_cells() -> dict[tuple[str, str, str], set[int]]:
    """(method, family, task) -> DESIGN.md property numbers of the property tests parametrized over that cell."""
    import test_properties as suite

    found: dict[tuple[str, str, str], set[int]] = {}
    for fn in vars(suite).values():
        number = getattr(fn, "covers", None)
        if number is None or not callable(fn):
            continue
        for mark in getattr(fn, "pytestmark", []):
            if mark.name == "parametrize" and mark.args[0] == "method,family,task":
                for param in mark.args[1]:
                    found.setdefault(tuple(param.values), set()).add(number)
    return found


def _numbers(numbers: set[int]) -> str:
    """1, 2, 3, 5 -> '1–3, 5'."""
    runs = []
    for n in sorted(numbers):
        if runs and n == runs[-1][1] + 1:
            runs[-1][1] = n
        else:
            runs.append([n, n])
    return ", ".join(f"{a}" if a == b else f"{a}–{b}" for a, b in runs) or "—"


def render() -> str:
    from capabilities import METHODS

    tested = tested_cells()
    lines = ["| family | " + " | ".join(f"`{t}`" for t in TASKS) + " |", "|---" * (len(TASKS) + 1) + "|"]
    for family in F.FAMILIES:
        counts = [sum(1 for m in METHODS if (m, family, t) in tested) for t in TASKS]
        lines.append(f"| {family} | " + " | ".join(f"✓ {n}" if n else "—" for n in counts) + " |")
    lines += ["", "| method | " + " | ".join(f"`{t}`" for t in TASKS) + " | families not tested |",
              "|---" * (len(TASKS) + 2) + "|"]
    for method, row in METHODS.items():
        per_task = []
        for task in TASKS:
            sets = [numbers for (m, _, t), numbers in tested.items() if m == method and t == task]
            per_task.append(_numbers(set.intersection(*sets)) if sets else "—")
        lines.append(f"| {method} | " + " | ".join(per_task) + f" | {', '.join(sorted(row.skip_families)) or '—'} |")
    lines += [
        "",
        "First table: ✓ n = the number of methods tested on that cell. Second table: the DESIGN.md §4 properties "
        "each method passes on every cell of that task type, from `tests/test_properties.py`, parametrized by the "
        f"capability table `tests/capabilities.py` (one row per method): {PROPERTIES}. Where a method is not the "
        "identity at init (the prompt methods, `mam`, `cross_attn`) 2 does not apply; 11 is listed where the table "
        "has a formula written from the model's shapes and HF PEFT's default targets (the other methods' counts are "
        "tested at full size in their own files). Untested families refuse with a clear error before the model "
        "changes: a prefix needs an attention that reads a key/value cache (DeBERTa has none), BitFit needs biases "
        "(T5, Llama and Mistral have none). `dora` is `LoraConfig(use_dora=True)`; `lora+pfeiffer`, `adapter+lora` "
        "and `cross_attn` are `UnifiedConfig` points. Property 12 (bad input raises a clear error before the model "
        "changes) is tested in `tests/test_bad_input.py` and each method's file; checkpoint interop with HF PEFT, "
        "both ways, in `tests/test_interop_peft.py` and the methods' files.",
    ]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    print(render(), end="")
