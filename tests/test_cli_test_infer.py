"""`unipeft test` and `unipeft infer` on a saved tiny run; the oracle is HF PEFT loading the same files."""
from __future__ import annotations

import csv
import io
import json
import os

import peft
import pytest
import torch
import transformers as T

from cli_helpers import fails, texts
from unipeft.cli import main


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory, tiny_model, tiny_csv):  # noqa: F811
    out = tmp_path_factory.mktemp("run") / "adapter"
    assert main(["train", "--model", tiny_model, "--data", tiny_csv, "--output-dir", str(out), "--epochs", "2",
                 "--batch-size", "16", "--max-length", "16", "--r", "4", "--lr", "0.03", "--no-progress"]) == 0
    return out


def peft_probabilities(run, tiny_model, texts):  # noqa: F811
    """Label probabilities from HF PEFT loading the run's files onto the base model: the oracle."""
    labels = json.loads((run / "metrics.json").read_text())["labels"]
    base = T.AutoModelForSequenceClassification.from_pretrained(tiny_model, num_labels=len(labels))
    model = peft.PeftModel.from_pretrained(base, run).eval()
    tokenizer = T.AutoTokenizer.from_pretrained(tiny_model)
    with torch.no_grad():
        logits = model(**tokenizer(texts, padding=True, truncation=True, max_length=16, return_tensors="pt")).logits
    return labels, logits.softmax(-1)


def write_csv(path, rows):
    with open(path, "w", newline="", encoding="utf-8") as fh:
        writer = csv.writer(fh)
        writer.writerow(["text", "label"])
        writer.writerows(rows)
    return path


def test_test_on_the_runs_split_reproduces_its_test_accuracy(trained_run, capsys):
    assert main(["test", "--checkpoint", str(trained_run)]) == 0
    line = capsys.readouterr().out.strip().splitlines()[-1]
    expected = json.loads((trained_run / "metrics.json").read_text())
    assert f"accuracy {expected['test_accuracy']:.4f} over {expected['num_test']} examples" in line


def test_test_on_a_file_equals_accuracy_computed_from_peft(trained_run, tiny_model, tmp_path, capsys):  # noqa: F811
    rows = texts(123, 40)
    labels, probabilities = peft_probabilities(trained_run, tiny_model, [t for t, _ in rows])
    expected = sum(labels[i] == label for i, (_, label) in zip(probabilities.argmax(-1).tolist(), rows)) / len(rows)
    data = write_csv(tmp_path / "more.csv", rows)
    assert main(["test", "--checkpoint", str(trained_run), "--data", str(data)]) == 0
    assert f"accuracy {expected:.4f} over 40 examples" in capsys.readouterr().out
    # the same file as --test-file (the run was trained with --data: its data options give way to the files)
    assert main(["test", "--checkpoint", str(trained_run), "--test-file", str(data)]) == 0
    assert f"accuracy {expected:.4f} over 40 examples" in capsys.readouterr().out


def test_infer_prints_peft_s_probabilities_for_arguments_files_and_stdin(trained_run, tiny_model, tmp_path,  # noqa: F811
                                                                         capsys, monkeypatch):
    texts = ["w1 great w2", "w3 awful w4", "w5 okay w6"]
    labels, probabilities = peft_probabilities(trained_run, tiny_model, texts)
    (tmp_path / "texts.txt").write_text("\n".join(texts) + "\n", encoding="utf-8")
    runs = [([*texts], None), (["--file", str(tmp_path / "texts.txt")], None), ([], "\n".join(texts) + "\n")]
    for extra, stdin in runs:
        if stdin is not None:
            monkeypatch.setattr("sys.stdin", io.StringIO(stdin))
        assert main(["infer", "--checkpoint", str(trained_run), *extra]) == 0
        rows = [json.loads(line) for line in capsys.readouterr().out.strip().splitlines()]
        assert [r["text"] for r in rows] == texts
        for row, p in zip(rows, probabilities):
            assert row["label"] == labels[int(p.argmax())]
            assert list(row["probabilities"]) == labels
            torch.testing.assert_close(torch.tensor(list(row["probabilities"].values())), p, rtol=1e-5, atol=1e-6)


def test_bad_input_is_one_clear_line_and_writes_nothing(trained_run, tmp_path, capsys):
    before = sorted(os.listdir(trained_run))
    checkpoint = ["--checkpoint", str(trained_run)]
    fails(capsys, ["test", "--checkpoint", str(tmp_path)], "is not an adapter folder or a saved model (no adapter_config.json or config.json)")
    unknown = write_csv(tmp_path / "unknown.csv", [("w1 great", "positive"), ("w2 meh", "ecstatic")])
    fails(capsys, ["test", *checkpoint, "--data", str(unknown)], "labels the checkpoint's head does not know: ['ecstatic']")
    fails(capsys, ["test", *checkpoint, "--data", str(unknown), "--text-column", "review"],
           "no text column 'review'", "columns found: ['text', 'label']")
    fails(capsys, ["test", *checkpoint, "--data", str(tmp_path / "missing.csv")], "does not exist")
    fails(capsys, ["infer", *checkpoint, "--file", str(tmp_path / "missing.txt")], "cannot read --file")
    elsewhere = tmp_path / "no-metrics"  # an adapter without the run's record: its data is not known
    elsewhere.mkdir()
    for name in ("adapter_config.json", "adapter_model.safetensors"):
        (elsewhere / name).write_bytes((trained_run / name).read_bytes())
    labels = ",".join(json.loads((trained_run / "metrics.json").read_text())["labels"])
    fails(capsys, ["test", "--checkpoint", str(elsewhere), "--labels", labels], "has no metrics.json", "pass --data FILE")
    fails(capsys, ["test", "--checkpoint", str(elsewhere)], "pass --labels")
    assert sorted(os.listdir(trained_run)) == before


@pytest.fixture(scope="module")
def full_run(tmp_path_factory, tiny_model, tiny_csv):  # noqa: F811
    out = tmp_path_factory.mktemp("full") / "model"
    assert main(["train", "--method", "full", "--model", tiny_model, "--data", tiny_csv, "--output-dir", str(out),
                 "--epochs", "2", "--batch-size", "16", "--max-length", "16", "--lr", "1e-3", "--no-progress"]) == 0
    return out


def test_full_fine_tuning_trains_every_weight_and_saves_the_model(full_run, tiny_model, capsys):  # noqa: F811
    metrics = json.loads((full_run / "metrics.json").read_text())
    assert not (full_run / "adapter_config.json").exists() and (full_run / "config.json").exists()
    base = T.AutoModel.from_pretrained(tiny_model).state_dict()
    tuned = T.AutoModelForSequenceClassification.from_pretrained(full_run)
    changed = {n for n, p in tuned.bert.state_dict().items() if n in base and p.is_floating_point() and not torch.equal(p, base[n])}
    assert {"encoder.layer.0.attention.self.query.weight", "embeddings.word_embeddings.weight"} <= changed
    assert metrics["trainable_params"] == metrics["total_params"] == sum(p.numel() for p in tuned.parameters())
    assert main(["test", "--checkpoint", str(full_run)]) == 0
    assert f"accuracy {metrics['test_accuracy']:.4f} over {metrics['num_test']} examples" in capsys.readouterr().out
    texts = ["w1 great w2", "w3 awful w4"]
    tokenizer = T.AutoTokenizer.from_pretrained(full_run)
    with torch.no_grad():
        expected = tuned.eval()(**tokenizer(texts, padding=True, return_tensors="pt")).logits.softmax(-1)
    assert main(["infer", "--checkpoint", str(full_run), *texts]) == 0
    rows = [json.loads(line) for line in capsys.readouterr().out.strip().splitlines()]
    torch.testing.assert_close(torch.tensor([list(r["probabilities"].values()) for r in rows]), expected, rtol=1e-5, atol=1e-6)
