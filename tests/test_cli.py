"""`unipeft train` end to end, offline: a tiny random BERT with a real tokenizer, a small local CSV/JSONL.

The training run happens once per module (through `python -m unipeft`, as a user runs it); the tests
then check its output folder, reload the adapter and recompute the reported accuracy, and check the
bad-input errors (one line on stderr, exit code 2, nothing written).
"""
from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

import unipeft
from unipeft.cli import main
from unipeft.train import data as train_data
from unipeft.train.methods import known_methods

from cli_helpers import HIDDEN, LAYERS, RANK, cli_env, fails, texts

TRAIN_ARGS = ["--epochs", "5", "--lr", "0.03", "--batch-size", "16", "--max-length", "16", "--r", str(RANK),
              "--alpha", "8", "--seed", "1", "--no-progress"]


@pytest.fixture(scope="module")
def trained(tiny_model, tiny_csv, tmp_path_factory):
    out = tmp_path_factory.mktemp("run") / "adapter"
    proc = subprocess.run(
        [sys.executable, "-m", "unipeft", "train", "--model", tiny_model, "--data", tiny_csv,
         "--output-dir", str(out), *TRAIN_ARGS],
        capture_output=True, text=True, env=cli_env(), timeout=600,
    )
    assert proc.returncode == 0, proc.stderr
    metrics = json.loads((out / "metrics.json").read_text())
    return out, metrics, proc.stdout


def test_output_folder_holds_adapter_and_metrics(trained):
    out, metrics, _ = trained
    assert sorted(p.name for p in out.iterdir()) == ["adapter_config.json", "adapter_model.safetensors", "checkpoint",
                                                     "curves.png", "log.jsonl", "metrics.json", "summary.md"]
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["task_type"] == "SEQ_CLS"
    assert config["r"] == RANK and config["lora_alpha"] == 8
    assert sorted(config["target_modules"]) == ["query", "value"]
    assert config["modules_to_save"] == ["classifier"]
    keys = load_file(out / "adapter_model.safetensors")
    assert keys, "empty adapter file"
    assert all(k.startswith("base_model.model.") for k in keys)
    assert {k.split(".")[-2] for k in keys} == {"lora_A", "lora_B", "classifier"}
    assert sum(k.endswith("lora_A.weight") for k in keys) == 2 * LAYERS  # query and value in each layer


def test_metrics_report_split_params_and_learning(trained):
    _, metrics, stdout = trained
    assert metrics["labels"] == ["negative", "neutral", "positive"]
    assert (metrics["num_train"], metrics["num_validation"], metrics["num_test"]) == (480, 60, 60)
    assert [e["epoch"] for e in metrics["epochs"]] == [1, 2, 3, 4, 5]
    # LoRA on query and value (A: r x in, B: out x r) in every layer, plus the classifier head
    expected = LAYERS * 2 * (2 * RANK * HIDDEN) + (HIDDEN * 3 + 3)
    assert metrics["trainable_params"] == expected
    assert metrics["trainable_percent"] == pytest.approx(100 * expected / metrics["total_params"])
    # the cue word decides the label: the adapter must learn it, the loss must fall
    assert metrics["epochs"][-1]["train_loss"] < metrics["epochs"][0]["train_loss"]
    assert metrics["test_accuracy"] >= metrics["majority_baseline"] + 0.3
    for epoch in metrics["epochs"]:
        assert f"epoch {epoch['epoch']}, step {epoch['epoch'] * 30}: validation accuracy " \
               f"{epoch['validation_accuracy']:.4f}" in stdout  # 480 rows / 16 = 30 steps an epoch
    # the adapter saved is the best evaluation's, and the validation figure reported is that evaluation's
    best = max(metrics["epochs"], key=lambda e: (e["validation_accuracy"], -e["epoch"]))
    assert metrics["best_step"] == best["epoch"] * 30
    assert metrics["validation_accuracy"] == best["validation_accuracy"]
    assert f"test: accuracy {metrics['test_accuracy']:.4f}" in stdout
    assert f"{metrics['majority_baseline']:.4f}" in stdout
    assert f"trainable params: {expected:,d}" in stdout


def _accuracy(model, tokenizer, examples, max_length) -> float:
    batch = tokenizer([e.text for e in examples], padding=True, truncation=True, max_length=max_length,
                      return_tensors="pt")
    with torch.no_grad():
        predictions = model(**batch).logits.argmax(-1).tolist()
    return sum(p == e.label for p, e in zip(predictions, examples)) / len(examples)


def test_saved_adapter_reloads_and_reproduces_test_accuracy(trained, tiny_model, tiny_csv):
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    out, metrics, _ = trained
    dataset = train_data.load_dataset(tiny_csv, split_seed=metrics["options"]["split_seed"])
    tokenizer = AutoTokenizer.from_pretrained(tiny_model)
    base = AutoModelForSequenceClassification.from_pretrained(tiny_model, num_labels=len(metrics["labels"]))
    model = unipeft.PeftModel.from_pretrained(base, str(out)).eval()
    max_length = metrics["options"]["max_length"]
    reloaded = _accuracy(model, tokenizer, dataset.test, max_length)
    assert reloaded == pytest.approx(metrics["test_accuracy"], abs=1e-9)
    with model.disable_adapter():  # the base with a fresh random head does not know the task
        assert _accuracy(model, tokenizer, dataset.test, max_length) < metrics["test_accuracy"]
    merged = model.merge_and_unload()
    assert _accuracy(merged, tokenizer, dataset.test, max_length) == pytest.approx(metrics["test_accuracy"], abs=1e-9)


def test_split_is_fixed_disjoint_and_independent_of_subsampling(tiny_csv):
    full = train_data.load_dataset(tiny_csv, split_seed=0)
    again = train_data.load_dataset(tiny_csv, split_seed=0, max_train_samples=50, max_eval_samples=10)
    other = train_data.load_dataset(tiny_csv, split_seed=1)
    texts = [{e.text for e in part} for part in (full.train, full.validation, full.test)]
    assert sum(map(len, texts)) == 600 and len(set.union(*texts)) == 600
    assert again.train == full.train[:50] and again.test == full.test[:10] and again.validation == full.validation[:10]
    assert {e.text for e in other.test} != texts[2]


def test_jsonl_with_custom_columns_and_integer_labels(tmp_path, tiny_model, capsys):
    rows = texts(1, 60)
    ids = {"negative": 2, "neutral": 10, "positive": 1}  # ids sort numerically, not as strings
    with open(tmp_path / "data.jsonl", "w") as fh:
        for text, label in rows:
            fh.write(json.dumps({"sentence": text, "y": ids[label]}) + "\n")
        fh.write(json.dumps({"sentence": rows[0][0], "y": 10}) + "\n")  # a repeated text is dropped
    out = tmp_path / "out"
    code = main(["train", "--model", tiny_model, "--data", str(tmp_path / "data.jsonl"), "--text-column", "sentence",
                 "--label-column", "y", "--epochs", "1", "--max-train-samples", "20", "--output-dir", str(out),
                 "--no-progress"])
    assert code == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["labels"] == ["1", "2", "10"]
    assert metrics["num_train"] == 20 and metrics["num_validation"] == metrics["num_test"] == 6
    assert "dropped 1 repeated text" in capsys.readouterr().out


# ---- bad input: one line naming the problem, exit code 2, no traceback, nothing written ----------------------
def test_unknown_method_lists_known_ones(tmp_path, tiny_model, tiny_csv, capsys):
    out = tmp_path / "out"
    fails(capsys, ["train", "--method", "dora-xl", "--model", tiny_model, "--data", tiny_csv, "--output-dir", str(out)],
           "unknown method 'dora-xl'", "known methods: " + ", ".join(known_methods()), out=out)


def test_missing_column_lists_columns_found(tmp_path, tiny_model, tiny_csv, capsys):
    out = tmp_path / "out"
    fails(capsys, ["train", "--model", tiny_model, "--data", tiny_csv, "--label-column", "sentiment",
                    "--output-dir", str(out)],
           "no label column 'sentiment'", "['id', 'text', 'label']", "--label-column", out=out)
    fails(capsys, ["train", "--model", tiny_model, "--data", tiny_csv, "--text-column", "body", "--output-dir", str(out)],
           "no text column 'body'", out=out)


def test_missing_or_unsupported_files(tmp_path, tiny_model, tiny_csv, capsys):
    out = tmp_path / "out"
    missing = tmp_path / "nope.csv"
    fails(capsys, ["train", "--model", tiny_model, "--data", str(missing), "--output-dir", str(out)],
           str(missing), "does not exist", out=out)
    other = tmp_path / "data.parquet"
    other.write_bytes(b"PAR1")
    fails(capsys, ["train", "--model", tiny_model, "--data", str(other), "--output-dir", str(out)],
           "unsupported file type", ".jsonl", out=out)
    fails(capsys, ["train", "--model", str(tmp_path / "no-model"), "--data", tiny_csv, "--output-dir", str(out)],
           "model folder", "no-model", "does not exist", out=out)


def test_single_label_and_bad_numbers(tmp_path, tiny_model, capsys):
    path = tmp_path / "one.csv"
    path.write_text("text,label\n" + "".join(f"t{i},pos\n" for i in range(10)))
    fails(capsys, ["train", "--model", tiny_model, "--data", str(path)], "at least 2 distinct labels", "['pos']")
    with pytest.raises(SystemExit) as exc:  # argparse: usage line + error, exit 2
        main(["train", "--epochs", "0"])
    assert exc.value.code == 2
    assert "--epochs: must be positive" in capsys.readouterr().err


def test_labels_mixing_numbers_and_names_are_refused(tmp_path, tiny_model, capsys):
    # "1" and "positive" would silently become two of six classes
    path = tmp_path / "mixed.csv"
    path.write_text("text,label\n" + "".join(f"t{i},{['0', '1', 'negative', 'positive'][i % 4]}\n" for i in range(20)))
    fails(capsys, ["train", "--model", tiny_model, "--data", str(path), "--output-dir", str(tmp_path / "out")],
          "column 'label' mixes numbers (0, 1) and names (negative, positive)", "every label as a name",
          out=tmp_path / "out")


def test_a_model_with_a_trained_head_of_another_size_is_refused_before_training(tmp_path, tiny_model, capsys):
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    three = tmp_path / "three-way"
    AutoModelForSequenceClassification.from_pretrained(
        tiny_model, num_labels=3, id2label={0: "neg", 1: "neu", 2: "pos"}).save_pretrained(three)
    AutoTokenizer.from_pretrained(tiny_model).save_pretrained(three)
    capsys.readouterr()  # transformers' own progress output
    two = tmp_path / "two.csv"
    two.write_text("text,label\n" + "".join(f"t{i} w{i % 7},{'ab'[i % 2]}\n" for i in range(40)))
    out = tmp_path / "out"
    fails(capsys, ["train", "--model", str(three), "--data", str(two), "--output-dir", str(out)],
          "already has a classification head with 3 outputs (neg, neu, pos), and this run needs 2", out=out)


def test_a_model_folder_without_tokenizer_files_is_refused_before_anything_is_written(tmp_path, tiny_model, tiny_csv,
                                                                                       capsys):
    # transformers would build a tokenizer of the special tokens alone, and the run would fail mid-way
    bare = tmp_path / "bare"
    bare.mkdir()
    for name in ("config.json", "model.safetensors"):
        shutil.copy(os.path.join(tiny_model, name), bare / name)
    out = tmp_path / "out"
    fails(capsys, ["train", "--model", str(bare), "--data", tiny_csv, "--output-dir", str(out)],
          f"model folder {bare} has no tokenizer files", "tokenizer.save_pretrained", out=out)


def test_a_binary_data_file_is_refused_as_not_text(tmp_path, tiny_model, capsys):
    path = tmp_path / "data.csv"
    path.write_bytes(bytes(range(256)) * 8)  # NUL and every other byte: what a zip or a model file holds
    err = fails(capsys, ["train", "--model", tiny_model, "--data", str(path), "--output-dir", str(tmp_path / "out")],
                "is not a text file (it holds NUL bytes)", out=tmp_path / "out")
    assert "columns found" not in err


def test_max_length_beyond_the_model_positions(tmp_path, tiny_model, tiny_csv, capsys):
    out = tmp_path / "out"
    fails(capsys, ["train", "--model", tiny_model, "--data", tiny_csv, "--max-length", "100", "--output-dir", str(out)],
           "--max-length 100", "(64 tokens)", out=out)


def test_console_script_exits_2_with_message(tmp_path):
    script = os.path.join(os.path.dirname(sys.executable), "unipeft")
    proc = subprocess.run([script, "train", "--method", "nope"], capture_output=True, text=True, env=cli_env(), timeout=300)
    assert proc.returncode == 2
    # every name `unipeft train --method` knows (the registry's presets and full), sorted
    assert proc.stderr.strip() == "unipeft train: error: unknown method 'nope'; known methods: " + ", ".join(known_methods())
    assert {"full", "lora", "prefix", "unified"} <= set(known_methods()) and known_methods() == sorted(known_methods())
    assert proc.stdout == ""


def test_readme_option_table_matches_the_parser():
    """Every option the README's `unipeft train` table names exists, and every real option is listed."""
    import re

    from unipeft.cli import build_parser

    readme = open(os.path.join(os.path.dirname(__file__), "..", "README.md"), encoding="utf-8").read()
    section = readme.split("## Main job: `unipeft train`", 1)[1].split("\n## ", 1)[0]
    table_rows = [line for line in section.splitlines() if line.startswith("| `--")]
    documented = {opt for row in table_rows for opt in re.findall(r"`(--[a-z0-9-]+)`", row.split("|")[1])}
    train = build_parser()._subparsers._group_actions[0].choices["train"]
    real = {s for a in train._actions for s in a.option_strings if s.startswith("--") and s != "--help"}
    assert documented == real


@pytest.mark.parametrize("method,peft_type", [("prompt", "PROMPT_TUNING"), ("ptuning", "P_TUNING"), ("prefix", "PREFIX_TUNING")])
def test_prompt_methods_train_from_the_command_line(method, peft_type, tmp_path, tiny_model, tiny_csv):
    """Each prompt method trains with its default (larger) learning rate and saves a reloadable adapter."""
    out = tmp_path / "adapter"
    proc = subprocess.run(
        [sys.executable, "-m", "unipeft", "train", "--model", tiny_model, "--data", tiny_csv, "--method", method,
         "--num-virtual-tokens", "4", "--output-dir", str(out), *TRAIN_ARGS],
        capture_output=True, text=True, env=cli_env(), timeout=600,
    )
    assert proc.returncode == 0, proc.stderr
    metrics = json.loads((out / "metrics.json").read_text())
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["peft_type"] == peft_type and config["num_virtual_tokens"] == 4
    assert metrics["epochs"][-1]["train_loss"] < metrics["epochs"][0]["train_loss"]
    assert "prompt_embeddings" in load_file(out / "adapter_model.safetensors")


# ---- IDPG and its PG variant from the command line ----------------------------------------------------------------
IDPG_TOKENS = 4
# TRAIN_ARGS without --lr: each method trains with its own default learning rate
IDPG_ARGS = [a for a in TRAIN_ARGS if a != "--lr" and a != "0.03"] + ["--num-virtual-tokens", str(IDPG_TOKENS)]


def _train(tiny_model, tiny_csv, out, *args):
    proc = subprocess.run(
        [sys.executable, "-m", "unipeft", "train", "--model", tiny_model, "--data", tiny_csv, "--output-dir", str(out),
         *args],
        capture_output=True, text=True, env=cli_env(), timeout=600,
    )
    assert proc.returncode == 0, proc.stderr
    return json.loads((out / "metrics.json").read_text()), proc.stdout


@pytest.fixture(scope="module", params=["idpg", "pg"])
def trained_idpg(request, tiny_model, tiny_csv, tmp_path_factory):
    out = tmp_path_factory.mktemp(f"run-{request.param}") / "adapter"
    metrics, stdout = _train(tiny_model, tiny_csv, out, "--method", request.param, *IDPG_ARGS)
    return request.param, out, metrics, stdout


def test_idpg_and_pg_save_their_config_generator_and_default_lr(trained_idpg):
    from unipeft.train.methods import default_lr

    method, out, metrics, stdout = trained_idpg
    assert sorted(p.name for p in out.iterdir()) == ["adapter_config.json", "adapter_model.safetensors", "checkpoint",
                                                     "curves.png", "log.jsonl", "metrics.json", "summary.md"]
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["peft_type"] == "IDPG" and config["task_type"] == "SEQ_CLS"
    assert config["learn_encoder_prompt"] is (method == "pg")
    assert config["sentence_encoder"] == "self" and config["num_virtual_tokens"] == IDPG_TOKENS
    assert config["modules_to_save"] == ["classifier"]
    hidden = config["generator_hidden_size"]
    shapes = {k: tuple(v.shape) for k, v in load_file(out / "adapter_model.safetensors").items()}
    generator = {k.split("prompt_encoder.", 1)[1]: v for k, v in shapes.items() if "prompt_encoder.generator." in k}
    # dropout -> Linear(d -> m) -> GELU -> dropout -> Linear(m -> t * d)
    assert generator == {"generator.1.weight": (hidden, HIDDEN), "generator.1.bias": (hidden,),
                         "generator.4.weight": (IDPG_TOKENS * HIDDEN, hidden), "generator.4.bias": (IDPG_TOKENS * HIDDEN,)}
    encoder_prompt = [v for k, v in shapes.items() if k.endswith("prompt_encoder.encoder_prompt")]
    assert encoder_prompt == ([(IDPG_TOKENS, HIDDEN)] if method == "pg" else [])
    assert not any("sentence_encoder" in k or "embeddings" in k for k in shapes)  # the frozen model is not saved
    expected = sum(math.prod(s) for s in shapes.values())  # the generator, PG's prompt and the head train
    assert metrics["trainable_params"] == expected and f"trainable params: {expected:,d}" in stdout
    assert metrics["method"] == method and metrics["lr"] == default_lr(method)
    assert metrics["steps"] == 5 * math.ceil(480 / 16)
    assert "sentence encoder: the model itself" in stdout
    assert ("with a learned encoder prompt" in stdout) is (method == "pg")


def test_idpg_and_pg_learn_and_reload_with_the_same_predictions(trained_idpg, tiny_model, tiny_csv):
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    method, out, metrics, _ = trained_idpg
    assert metrics["epochs"][-1]["train_loss"] < metrics["epochs"][0]["train_loss"]
    assert metrics["test_accuracy"] > metrics["majority_baseline"]
    dataset = train_data.load_dataset(tiny_csv, split_seed=metrics["options"]["split_seed"])
    tokenizer = AutoTokenizer.from_pretrained(tiny_model)
    base = AutoModelForSequenceClassification.from_pretrained(tiny_model, num_labels=len(metrics["labels"]))
    model = unipeft.PeftModel.from_pretrained(base, str(out)).eval()
    assert type(model.active_peft_config).__name__ == "IDPGConfig"
    assert model.active_peft_config.learn_encoder_prompt is (method == "pg")
    max_length = metrics["options"]["max_length"]
    assert _accuracy(model, tokenizer, dataset.test, max_length) == pytest.approx(metrics["test_accuracy"], abs=1e-9)
    with model.disable_adapter():  # the base with a fresh random head does not know the task
        assert _accuracy(model, tokenizer, dataset.test, max_length) < metrics["test_accuracy"]


def test_idpg_with_a_separate_sentence_encoder(tmp_path, tiny_model, tiny_csv):
    """--sentence-encoder loads a frozen HF encoder (here a copy of the tiny model) that is named, not saved."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    out = tmp_path / "adapter"
    metrics, stdout = _train(tiny_model, tiny_csv, out, "--method", "idpg", "--sentence-encoder", tiny_model, *IDPG_ARGS,
                             "--max-train-samples", "64", "--epochs", "1")  # the later --epochs wins
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["peft_type"] == "IDPG" and config["sentence_encoder"] == tiny_model
    assert f"sentence encoder: {tiny_model}" in stdout
    keys = load_file(out / "adapter_model.safetensors")
    assert any("prompt_encoder.generator." in k for k in keys)
    assert not any("sentence_encoder" in k for k in keys)
    # the encoder's weights are frozen and not counted as trainable
    assert metrics["trainable_params"] == sum(v.numel() for v in keys.values())
    dataset = train_data.load_dataset(tiny_csv, split_seed=0)
    base = AutoModelForSequenceClassification.from_pretrained(tiny_model, num_labels=3)
    model = unipeft.PeftModel.from_pretrained(base, str(out)).eval()
    reloaded = _accuracy(model, AutoTokenizer.from_pretrained(tiny_model), dataset.test, metrics["options"]["max_length"])
    assert reloaded == pytest.approx(metrics["test_accuracy"], abs=1e-9)


@pytest.mark.parametrize("method", ["prompt", "prefix", "idpg", "pg"])
def test_virtual_tokens_must_fit_with_max_length(method, tmp_path, tiny_model, tiny_csv, capsys):
    """The tiny model has 64 positions: 60 tokens of text and 8 virtual tokens would fail at the first long batch."""
    out = tmp_path / "out"
    fails(capsys, ["train", "--method", method, "--model", tiny_model, "--data", tiny_csv, "--max-length", "60",
                    "--num-virtual-tokens", "8", "--output-dir", str(out)],
           "max_length 60 plus 8 virtual tokens", "64 positions", "--max-length 56", out=out)
    fails(capsys, ["train", "--method", method, "--model", tiny_model, "--data", tiny_csv,
                    "--num-virtual-tokens", "64", "--output-dir", str(out)],
           "64 virtual tokens leave no room", out=out)


def test_bad_sentence_encoder(tmp_path, tiny_model, tiny_csv, capsys):
    from transformers import BertConfig, BertModel

    out = tmp_path / "out"
    fails(capsys, ["train", "--method", "idpg", "--model", tiny_model, "--data", tiny_csv, "--max-length", "16",
                    "--sentence-encoder", str(tmp_path / "no-encoder"), "--output-dir", str(out)],
           "cannot load sentence encoder", "no-encoder", out=out)
    small = tmp_path / "small-vocab"
    BertModel(BertConfig(vocab_size=10, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                         intermediate_size=16, max_position_embeddings=64)).save_pretrained(small)
    capsys.readouterr()  # transformers' saving progress bar
    fails(capsys, ["train", "--method", "pg", "--model", tiny_model, "--data", tiny_csv, "--max-length", "16",
                    "--sentence-encoder", str(small), "--output-dir", str(out)],
           "has 10 tokens", "must share the model's tokenizer", out=out)
    short = tmp_path / "short-positions"
    BertModel(BertConfig(vocab_size=100, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                         intermediate_size=16, max_position_embeddings=20)).save_pretrained(short)
    capsys.readouterr()  # transformers' saving progress bar
    fails(capsys, ["train", "--method", "pg", "--model", tiny_model, "--data", tiny_csv, "--max-length", "16",
                    "--sentence-encoder", str(short), "--num-virtual-tokens", "8", "--output-dir", str(out)],
           "has 20 positions", "max_length 16 plus 8 encoder-prompt tokens", out=out)


def test_the_parser_offers_exactly_the_choices_the_code_knows():
    """cli.py spells these choices out: they must stay the code's."""
    from unipeft.cli import build_parser
    from unipeft.train.generation import SEARCHES
    from unipeft.train.plan import EVAL_MODES
    from unipeft.train.loop_options import SCHEDULES

    train = build_parser()._subparsers._group_actions[0].choices["train"]
    choices = {a.dest: tuple(a.choices) for a in train._actions if a.choices}
    assert choices["schedule"] == SCHEDULES and choices["search"] == SEARCHES and choices["eval_mode"] == EVAL_MODES
    precisions = {a.const for a in train._actions if a.dest == "precision"} | {train.get_default("precision")}
    from unipeft.train.loop_options import PRECISIONS

    assert precisions == set(PRECISIONS)
