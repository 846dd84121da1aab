"""A run's human-readable reports: the training curves (curves.png) and a markdown summary (summary.md).

Both are written atomically (temporary file, then os.replace), so a reader never sees half a file.
"""
from __future__ import annotations

import io
import math

from ..atomic_files import atomic_write_files, atomic_write_text
from .errors import UsageError

PANEL_INCHES = (5.0, 4.0)  # width, height of one panel
DPI = 100


def new_figure(panels: int = 1):
    """A matplotlib Figure of `panels` PANEL_INCHES panels side by side, without pyplot (the caller's backend
    stays as it is); a missing matplotlib is a UsageError naming the package."""
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError:
        raise UsageError("plots need the package 'matplotlib': pip install matplotlib") from None
    figure = Figure(figsize=(PANEL_INCHES[0] * panels, PANEL_INCHES[1]), dpi=DPI)
    FigureCanvasAgg(figure)
    return figure


def save_figure(figure, path: str) -> None:
    figure.tight_layout()
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=DPI)
    atomic_write_files({path: buffer.getvalue()})


def write_curves(history: list[dict], path: str, main_metric: str | None = None) -> None:
    """Plot training loss vs step and, when there are evaluation records, each evaluated metric vs step (the
    main metric drawn bold) in a second panel. The image is PANEL_INCHES × DPI pixels per panel, side by side."""
    train = [r for r in history if "loss" in r]
    evals = [r for r in history if "eval" in r]
    panels = 2 if evals else 1
    figure = new_figure(panels)
    loss_axes = figure.add_subplot(1, panels, 1)
    loss_axes.set(title="training loss", xlabel="optimizer step", ylabel="loss")
    if train:
        loss_axes.plot([r["step"] for r in train], [r["loss"] for r in train], marker=".", color="tab:blue")
    else:
        loss_axes.text(0.5, 0.5, "no training-loss records", ha="center", va="center", transform=loss_axes.transAxes)
    if evals:
        eval_axes = figure.add_subplot(1, panels, 2)
        eval_axes.set(title="evaluation", xlabel="optimizer step")
        names = sorted({name for r in evals for name in r["eval"]}, key=lambda name: name != main_metric)
        for name in names:
            points = [(r["step"], r["eval"][name]) for r in evals if name in r["eval"]]
            main = name == main_metric
            eval_axes.plot(*zip(*points), marker="o" if main else ".", linewidth=2.5 if main else 1.0,
                           alpha=1.0 if main else 0.6, label=f"{name} (main)" if main else name)
        eval_axes.legend()
    save_figure(figure, path)


def _number(value) -> str:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return str(value)
    if isinstance(value, int):
        return f"{value:,d}"
    return "nan" if math.isnan(value) else f"{value:.4f}"


def summary_markdown(metrics: dict) -> str:
    """The summary's text. Keys read (each optional; a missing one leaves its line out):
    task, model, method, device, trainable_params, total_params, trainable_percent, steps, best_step,
    validation ({metric: value}, the final evaluation), test ({metric: value}), train_seconds,
    examples_per_second, peak_memory_mb."""
    get = metrics.get
    lines = [f"# Run summary{': ' + str(get('task')) if get('task') else ''}", ""]
    for key, label in (("task", "Task"), ("model", "Model"), ("method", "Method"), ("device", "Device")):
        if get(key) is not None:
            lines.append(f"- {label}: {get(key)}")
    if get("trainable_params") is not None:
        share = f" ({get('trainable_percent'):.4f}%)" if get("trainable_percent") is not None else ""
        total = f" of {_number(get('total_params'))}" if get("total_params") is not None else ""
        lines.append(f"- Trainable parameters: {_number(get('trainable_params'))}{total}{share}")
    if get("steps") is not None:
        lines.append(f"- Optimizer steps: {_number(get('steps'))}")
    if get("best_step") is not None:
        lines.append(f"- Best step: {_number(get('best_step'))}")
    if get("train_seconds") is not None:
        lines.append(f"- Training time: {get('train_seconds'):.1f} s")
    if get("examples_per_second") is not None:
        lines.append(f"- Throughput: {get('examples_per_second'):.1f} examples/s")
    if get("peak_memory_mb") is not None:
        lines.append(f"- Peak memory: {get('peak_memory_mb'):.0f} MiB")
    splits = [(name, get(name)) for name in ("validation", "test") if get(name)]
    if splits:
        names = list(dict.fromkeys(metric for _, values in splits for metric in values))
        lines += ["", "| metric | " + " | ".join(split for split, _ in splits) + " |",
                  "|---|" + "---|" * len(splits)]
        for metric in names:
            cells = [_number(values[metric]) if metric in values else "" for _, values in splits]
            lines.append(f"| {metric} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def write_summary(metrics: dict, path: str) -> None:
    """Write summary.md for a run; see summary_markdown for the keys read."""
    atomic_write_text(path, summary_markdown(metrics))
