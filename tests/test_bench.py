"""`unipeft bench`: each method trains in its own `unipeft train` process with the same options; the table
(bench.md, bench.json) and the plot (bench.png) report what each run's metrics.json holds.

One real bench runs per session, shared by the xdist workers (tiny random BERT, 100 rows, 1 epoch): lora and
ia3 complete, prompt tuning with more virtual tokens than the model has positions fails and becomes a failed
row between them. Bad input
is checked with the training subprocess replaced, so "before any run starts" is observed, not assumed.
"""
from __future__ import annotations

import datetime
import json
import os
import platform
import subprocess

import pytest
from filelock import FileLock
from safetensors.torch import load_file

from cli_helpers import HIDDEN, LAYERS, RANK, texts, write_csv, write_tiny_model
from unipeft.cli import main
from unipeft.train import bench as bench_mod

TRAIN_OPTIONS = ["--epochs", "1", "--batch-size", "16", "--max-length", "16", "--r", str(RANK), "--seed", "3",
                 "--num-virtual-tokens", "64"]  # read by prompt only: 64 tokens fill the tiny model's 64 positions
METHODS = ["lora", "prompt", "ia3"]
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def _shared_folder(tmp_path_factory):
    """One folder for the whole session: under xdist the workers share it, so the bench runs once."""
    base = tmp_path_factory.getbasetemp()
    return (base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base) / "bench-shared"


def _write_model_and_data(folder) -> None:
    """The command-line tests' tiny BERT (with dropout) and 100 labelled rows."""
    write_tiny_model(folder / "tiny-bert", dropout=0.1)
    write_csv(folder / "reviews.csv", ["text", "label"], texts(7, 100))


@pytest.fixture(scope="module")
def shared(tmp_path_factory):
    """(folder, model, data); the folder also holds the bench's results once `benched` has run."""
    folder = _shared_folder(tmp_path_factory)
    folder.mkdir(parents=True, exist_ok=True)
    with FileLock(str(folder) + ".lock"):
        if not (folder / "reviews.csv").exists():
            _write_model_and_data(folder)
    return folder, str(folder / "tiny-bert"), str(folder / "reviews.csv")


@pytest.fixture(scope="module")
def tiny_model(shared) -> str:
    return shared[1]


@pytest.fixture(scope="module")
def small_csv(shared) -> str:
    return shared[2]


@pytest.fixture(scope="module")
def benched(shared):
    folder, model, data = shared
    out, done = folder / "results", folder / "bench-days.json"
    with FileLock(str(folder) + ".lock"):
        if not done.exists():
            days = [datetime.date.today().isoformat()]
            with pytest.MonkeyPatch.context() as mp:
                mp.setenv("OMP_NUM_THREADS", "1")  # the training subprocesses: one thread each, next to a worker
                mp.setenv("HF_HUB_OFFLINE", "1")
                code = main(["bench", "--methods", ",".join(METHODS), "--output-dir", str(out), "--model", model,
                             "--data", data, *TRAIN_OPTIONS])
            assert code == 0
            done.write_text(json.dumps(days + [datetime.date.today().isoformat()]), encoding="utf-8")
    report = json.loads((out / "bench.json").read_text(encoding="utf-8"))
    return out, report, json.loads(done.read_text(encoding="utf-8"))


def _metrics(out, method) -> dict:
    return json.loads((out / method / "metrics.json").read_text(encoding="utf-8"))


def _table_rows(markdown: str) -> list[list[str]]:
    lines = [line for line in markdown.splitlines() if line.startswith("| ")]
    assert lines[0].startswith("| method | metric | validation | test |")  # the header
    return [[cell.strip() for cell in line.strip().strip("|").split("|")] for line in lines[1:]]


def test_each_row_equals_its_runs_metrics(benched, tiny_model, small_csv):
    out, report, _ = benched
    rows = {row["method"]: row for row in report["rows"]}
    assert [row["method"] for row in report["rows"]] == METHODS
    for method in ("lora", "ia3"):
        m, row = _metrics(out, method), rows[method]
        assert m["method"] == method and m["model"] == tiny_model and m["data"] == small_csv
        assert m["options"]["output_dir"] == str(out / method)
        assert (m["options"]["epochs"], m["options"]["max_length"], m["options"]["r"]) == (1, 16, RANK)
        assert row["metric"] == m["main_metric"] == "accuracy"
        assert row["validation"] == m["validation"]["accuracy"] == m["validation_accuracy"]
        assert row["test"] == m["test"]["accuracy"] == m["test_accuracy"]
        for key in ("trainable_params", "trainable_percent", "train_seconds", "peak_memory_mb", "steps"):
            assert row[key] == m[key], key
        assert row["trainable_percent"] == pytest.approx(100 * m["trainable_params"] / m["total_params"])
        # what trains is what is saved: the adapter file's elements, the classifier head included
        saved = load_file(out / method / "adapter_model.safetensors")
        assert row["trainable_params"] == sum(t.numel() for t in saved.values())
        assert row["steps"] == 5  # 80 training rows in batches of 16, one epoch
    # LoRA A (r x in) and B (out x r) on query and value in each layer, plus the 3-class head
    assert rows["lora"]["trainable_params"] == LAYERS * 2 * (2 * RANK * HIDDEN) + (HIDDEN * 3 + 3)
    assert rows["ia3"]["trainable_params"] < rows["lora"]["trainable_params"]


def test_a_failed_method_is_a_row_and_the_others_complete(benched):
    out, report, _ = benched
    failed = report["rows"][METHODS.index("prompt")]
    assert failed == {"method": "prompt",
                      "error": "unipeft train: error: 64 virtual tokens leave no room for text in the model's 64 "
                               "positions; choose fewer --num-virtual-tokens"}
    assert not (out / "prompt" / "metrics.json").exists()
    assert (out / "ia3" / "metrics.json").exists()  # the method after the failure ran
    rows = _table_rows((out / "bench.md").read_text(encoding="utf-8"))
    assert rows[METHODS.index("prompt")] == ["prompt", f"failed: {failed['error']}", "", "", "", "", "", ""]


def test_markdown_has_one_row_per_method_with_the_json_numbers(benched):
    out, report, _ = benched
    rows = _table_rows((out / "bench.md").read_text(encoding="utf-8"))
    assert [r[0] for r in rows] == METHODS
    for cells, row in zip(rows, report["rows"]):
        if "error" in row:
            continue
        assert cells == [row["method"], "accuracy", f"{row['validation']:.4f}", f"{row['test']:.4f}",
                         f"{row['trainable_params']:,d}", f"{row['trainable_percent']:.4f}",
                         f"{row['train_seconds']:.0f}", f"{row['peak_memory_mb']:.0f}"]
        assert row["method"] != "lora" or cells[4] == "1,123"  # thousands are separated


def test_plot_is_a_png_matplotlib_reads_back(benched):
    import matplotlib.image

    out, _, _ = benched
    data = (out / "bench.png").read_bytes()
    assert data.startswith(PNG_SIGNATURE)
    image = matplotlib.image.imread(out / "bench.png")
    assert image.ndim == 3 and image.shape[2] in (3, 4) and min(image.shape[:2]) >= 200
    assert image[..., :3].min() < 0.5 < image[..., :3].max()  # something is drawn on the white background
    # no temporary files are left, and the failed method has no folder
    assert sorted(os.listdir(out)) == ["bench.json", "bench.md", "bench.png", "ia3", "lora"]


def test_title_names_task_model_machine_and_date(benched, tiny_model, small_csv):
    out, report, days = benched
    markdown = (out / "bench.md").read_text(encoding="utf-8")
    title = markdown.splitlines()[0]
    assert title == report["title"]
    cpus = os.cpu_count()
    machine = f"{platform.system()} {platform.machine()}, {cpus} CPU core{'s' if cpus != 1 else ''}"
    assert report["machine"].startswith(machine) and report["machine"] in title
    assert report["date"] in days and report["date"] in title
    assert title.startswith(f"Methods on file with {tiny_model} (5 steps each;")
    assert report["train_args"] == ["--model", tiny_model, "--data", small_csv, *TRAIN_OPTIONS]


# ---- bad input: exit 2 before any run starts, nothing written ---------------------------------------------------
@pytest.fixture
def no_runs(monkeypatch):
    """The training subprocess, replaced: any call is a run that should not have started."""
    calls = []

    def fake_run(argv, **kwargs):
        calls.append(argv)
        return subprocess.CompletedProcess(argv, 1, "", "unipeft train: error: fake failure\n")

    monkeypatch.setattr(bench_mod.subprocess, "run", fake_run)
    return calls


def _refused(capsys, argv, *needles):
    code = main(argv)
    err = capsys.readouterr().err
    assert code == 2, err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1, err
    assert err.startswith("unipeft bench: error: "), err
    for needle in needles:
        assert needle in err, err
    return err


@pytest.mark.parametrize("extra,needles", [
    (["--method", "ia3"], ["bench chooses --method itself"]),
    (["--method=ia3"], ["bench chooses --method itself"]),
    (["--resume"], ["bench chooses --resume itself"]),
    (["--res"], ["bench chooses --resume itself"]),  # argparse would take the abbreviation for --resume
    (["--out", "elsewhere"], ["bench chooses --output-dir itself"]),
    (["--task", "nope"], ["unknown task 'nope'", "known tasks: tweets"]),
    (["--early-stopping", "2"], ["--early-stopping needs several evaluations"]),
    (["--device", "nonsense"], ["unknown device 'nonsense'"]),
    (["--label-column", "stars"], ["no label column 'stars'", "columns found: ['text', 'label']"]),
    (["--method-config", "missing.json"], ["cannot read --method-config missing.json"]),
], ids=["method", "method=", "resume", "resume-abbreviated", "output-dir-abbreviated", "task", "early-stopping",
        "device", "column", "method-config"])
def test_a_bad_or_reserved_training_option_is_refused_before_any_run(extra, needles, tmp_path, tiny_model,
                                                                    small_csv, no_runs, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    out = tmp_path / "bench"
    _refused(capsys, ["bench", "--methods", "lora,ia3", "--output-dir", str(out), "--model", tiny_model,
                      "--data", small_csv, "--epochs", "1", *extra], *needles)
    assert no_runs == [] and not out.exists() and os.listdir(tmp_path) == []


@pytest.mark.parametrize("extra,needle", [(["--epochs", "0"], "--epochs: must be positive"),
                                          (["--bogus"], "unrecognized training option(s): --bogus")])
def test_a_training_option_argparse_refuses_exits_2_before_any_run(extra, needle, tmp_path, tiny_model,
                                                                   small_csv, no_runs, capsys):
    out = tmp_path / "bench"
    _refused(capsys, ["bench", "--methods", "lora", "--output-dir", str(out), "--model", tiny_model, "--data",
                      small_csv, *extra], needle)
    assert no_runs == [] and not out.exists()


def test_unknown_or_repeated_method_is_refused_before_any_run(tmp_path, tiny_model, small_csv, no_runs,
                                                              capsys):
    out = tmp_path / "bench"
    base = ["--output-dir", str(out), "--model", tiny_model, "--data", small_csv]
    _refused(capsys, ["bench", "--methods", "lora,lora-xl", *base], "unknown method 'lora-xl'",
             "known methods: adalora, bitfit")
    _refused(capsys, ["bench", "--methods", "lora,ia3,LoRA", *base], "names a method twice")
    assert no_runs == [] and not out.exists()


def test_an_existing_method_folder_is_refused_and_left_alone(tmp_path, tiny_model, small_csv, no_runs,
                                                             capsys):
    out = tmp_path / "bench"
    (out / "ia3").mkdir(parents=True)
    (out / "ia3" / "metrics.json").write_text('{"earlier": true}\n', encoding="utf-8")
    _refused(capsys, ["bench", "--methods", "lora,ia3", "--output-dir", str(out), "--model", tiny_model,
                      "--data", small_csv], str(out), "['ia3']", "choose another --output-dir")
    assert no_runs == []
    assert sorted(os.listdir(out)) == ["ia3"] and os.listdir(out / "ia3") == ["metrics.json"]
    assert (out / "ia3" / "metrics.json").read_text(encoding="utf-8") == '{"earlier": true}\n'


def test_each_run_gets_the_same_options_its_method_and_its_folder(tmp_path, tiny_model, small_csv, no_runs,
                                                                  capsys):
    """--output-dir after the training options is still bench's folder; the runs go into its <method>/ folders.
    With every run failing the table is all failed rows, the plot is still written, and the exit code is 1."""
    out = tmp_path / "bench"
    options = ["--model", tiny_model, "--data", small_csv, "--epochs", "1", "--lr", "0.01"]
    assert main(["bench", "--methods", "ia3,lora", *options, "--output-dir", str(out)]) == 1
    assert [argv[argv.index("train") + 1:] for argv in no_runs] == [
        [*options, "--method", method, "--output-dir", str(out / method), "--no-progress"] for method in ("ia3", "lora")]
    report = json.loads((out / "bench.json").read_text(encoding="utf-8"))
    assert report["rows"] == [{"method": m, "error": "unipeft train: error: fake failure"} for m in ("ia3", "lora")]
    assert report["title"] == "All methods failed"
    assert _table_rows((out / "bench.md").read_text(encoding="utf-8"))[1][:2] == ["lora", "failed: unipeft train: "
                                                                                 "error: fake failure"]
    assert (out / "bench.png").read_bytes().startswith(PNG_SIGNATURE)


def test_an_empty_method_list_asks_for_method_names(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["bench", "--methods", ""])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and "Traceback" not in err
    assert "--methods: expected comma-separated method names, e.g. lora,ia3" in err and "module" not in err
