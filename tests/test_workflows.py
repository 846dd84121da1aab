"""Every `unipeft train|test|infer` mode end to end, offline, on tiny random models and small local files.

Each reported metric is recomputed here from an independent oracle: Hugging Face PEFT loading the saved adapter
onto a fresh base model (one unpadded example at a time, HF `generate` for generations, a plain log-softmax
loop for label words), with the metric written out by hand or taken from the reference package (scipy,
sacrebleu, rouge_score) called directly. The CLI runs in-process through `unipeft.cli.main`.
"""
from __future__ import annotations

import json
import math
import os

import peft
import pytest
import torch
import transformers as T
from safetensors.torch import load_file

import workflow_models as W
from unipeft.cli import main
from unipeft.train.data import Example
from unipeft.train.generation import pick_demos
from unipeft.train.task_data import load_task_dataset

# the run's defaults that decide which rows are evaluated (TrainOptions: split_seed 0, 4000 / 2000 samples)
ROWS = dict(split_seed=0, max_train_samples=4000, max_eval_samples=2000)
MAX_LENGTH = 16
COMMON = ["--no-progress", "--seed", "1", "--batch-size", "16", "--max-length", str(MAX_LENGTH), "--r", "4"]


@pytest.fixture(scope="module")
def bert(tmp_path_factory) -> str:
    return W.tiny_bert(tmp_path_factory.mktemp("bert"))


@pytest.fixture(scope="module")
def t5(tmp_path_factory) -> str:
    return W.tiny_t5(tmp_path_factory.mktemp("t5"))


@pytest.fixture(scope="module")
def gpt2(tmp_path_factory) -> str:
    return W.tiny_gpt2(tmp_path_factory.mktemp("gpt2"))


def train(out, *args: str) -> dict:
    assert main(["train", *args, "--output-dir", str(out), *COMMON]) == 0
    return json.loads((out / "metrics.json").read_text())


def last_line(capsys) -> str:
    return capsys.readouterr().out.strip().splitlines()[-1]


def infer_rows(capsys, run, *texts: str) -> list[dict]:
    capsys.readouterr()
    assert main(["infer", "--checkpoint", str(run), *texts]) == 0
    return [json.loads(line) for line in capsys.readouterr().out.strip().splitlines()]


# ---- oracles --------------------------------------------------------------------------------------------

def peft_classifier(base_dir: str, run, num_labels: int):
    kwargs = {"problem_type": "regression"} if num_labels == 1 else {}
    base = T.AutoModelForSequenceClassification.from_pretrained(base_dir, num_labels=num_labels, **kwargs)
    return peft.PeftModel.from_pretrained(base, str(run)).eval(), T.AutoTokenizer.from_pretrained(base_dir)


def pair_logits(model, tokenizer, pairs: list[tuple[str, str]]) -> list[list[float]]:
    out = []
    with torch.no_grad():
        for first, second in pairs:
            enc = tokenizer(first, second, truncation=True, max_length=MAX_LENGTH, return_tensors="pt")
            out.append(model(**enc).logits[0].tolist())
    return out


def peft_lm(base_dir: str, run, seq2seq: bool):
    auto = T.AutoModelForSeq2SeqLM if seq2seq else T.AutoModelForCausalLM
    base = auto.from_pretrained(base_dir)
    model = base if run is None else peft.PeftModel.from_pretrained(base, str(run))
    return model.eval(), T.AutoTokenizer.from_pretrained(base_dir)


def hf_generate(model, tokenizer, text: str, *, decoder_only: bool, max_new_tokens: int, beams: int = 1) -> str:
    enc = tokenizer(text, truncation=not decoder_only, max_length=MAX_LENGTH, return_tensors="pt")
    assert enc["input_ids"].shape[1] <= MAX_LENGTH  # no prompt is cut: the oracle need not know how
    options = dict(max_new_tokens=max_new_tokens, do_sample=False, num_beams=beams,
                   pad_token_id=tokenizer.pad_token_id)
    if beams > 1:  # unipeft's beam search stops once num_beams hypotheses are done (not HF's default False)
        options["early_stopping"] = True
    with torch.no_grad():
        out = model.generate(**enc, **options)[0]
    if decoder_only:
        out = out[enc["input_ids"].shape[1]:]
    text = tokenizer.decode(out, skip_special_tokens=True)
    return (text.split("\n", 1)[0] if decoder_only else text).strip()


def label_word_scores(model, tokenizer, prompt: str, words: list[str]) -> list[float]:
    """Summed log-probability of each word's tokens after the prompt, one unpadded forward per word."""
    context = tokenizer(prompt)["input_ids"]
    scores = []
    with torch.no_grad():
        for word in words:
            target = tokenizer(" " + word, add_special_tokens=False)["input_ids"]
            log_probs = model(input_ids=torch.tensor([context + target])).logits[0].float().log_softmax(-1)
            scores.append(sum(log_probs[len(context) - 1 + i, t].item() for i, t in enumerate(target)))
    return scores


def sst2_icl_accuracy(model, tokenizer, demos: list[Example], test: list[Example]) -> tuple[float, list[int]]:
    """SST-2 in context: 'Review: ...\\nSentiment: word' per demonstration, blank lines between, then the query."""
    words = ["negative", "positive"]
    shots = "".join(f"Review: {d.text}\nSentiment: {words[d.label]}\n\n" for d in demos)
    predictions = []
    for e in test:
        scores = label_word_scores(model, tokenizer, shots + f"Review: {e.text}\nSentiment:", words)
        predictions.append(max(range(len(words)), key=scores.__getitem__))
    return sum(p == e.label for p, e in zip(predictions, test)) / len(test), predictions


def adapter_tensors(run) -> dict[str, torch.Tensor]:
    return load_file(os.path.join(run, "adapter_model.safetensors"))


# ---- 1. pair classification -----------------------------------------------------------------------------

def test_pair_classification_f1_and_accuracy_in_train_test_and_infer_match_peft(bert, tmp_path, capsys):
    rows = W.pair_rows(300)
    data = W.write_csv(tmp_path / "pairs.csv", ["sentence1", "sentence2", "label"], rows)
    metrics = train(tmp_path / "run", "--model", bert, "--task", "mrpc", "--data", data, "--epochs", "6",
                    "--lr", "0.05")
    assert metrics["labels"] == ["not_equivalent", "equivalent"] and metrics["head"] == "classifier"

    test_rows = load_task_dataset("mrpc", data, **ROWS).test
    assert len(test_rows) == metrics["num_test"] == 30
    truth = {(a, b): label for a, b, label in rows}
    assert all(truth[(e.text, e.text_pair)] == e.label for e in test_rows)  # sentence1, sentence2, label

    model, tokenizer = peft_classifier(bert, tmp_path / "run", 2)
    logits = pair_logits(model, tokenizer, [(e.text, e.text_pair) for e in test_rows])
    predicted = [int(row[1] > row[0]) for row in logits]
    gold = [e.label for e in test_rows]
    tp = sum(p == 1 and g == 1 for p, g in zip(predicted, gold))
    fp = sum(p == 1 and g == 0 for p, g in zip(predicted, gold))
    fn = sum(p == 0 and g == 1 for p, g in zip(predicted, gold))
    assert tp > 0 and 0 in predicted  # an F1 that is neither undefined nor all-positive
    precision, recall = tp / (tp + fp), tp / (tp + fn)
    f1 = 2 * precision * recall / (precision + recall)
    accuracy = sum(p == g for p, g in zip(predicted, gold)) / len(gold)
    assert metrics["test"]["f1"] == pytest.approx(f1, abs=1e-9)
    assert metrics["test"]["accuracy"] == pytest.approx(accuracy, abs=1e-9)
    assert metrics["test_accuracy"] == metrics["test"]["accuracy"]

    capsys.readouterr()
    assert main(["test", "--checkpoint", str(tmp_path / "run")]) == 0
    assert f"f1 {f1:.4f}, accuracy {accuracy:.4f} over 30 examples" in last_line(capsys)
    # the saved adapter is the best evaluation's: on the validation split it scores what metrics.json reports
    assert main(["test", "--checkpoint", str(tmp_path / "run"), "--split", "validation"]) == 0
    validation = metrics["validation"]
    assert f"f1 {validation['f1']:.4f}, accuracy {validation['accuracy']:.4f} over 30 examples" in last_line(capsys)

    pairs = [(e.text, e.text_pair) for e in test_rows[:3]]
    out = infer_rows(capsys, tmp_path / "run", *(f"{a}\t{b}" for a, b in pairs))
    for row, (a, b), expected in zip(out, pairs, pair_logits(model, tokenizer, pairs)):
        probabilities = torch.tensor(expected).softmax(-1).tolist()
        assert row["text"] == f"{a}\t{b}"
        assert row["label"] == ["not_equivalent", "equivalent"][int(probabilities[1] > probabilities[0])]
        assert row["probabilities"]["not_equivalent"] == pytest.approx(probabilities[0], abs=1e-5)
        assert row["probabilities"]["equivalent"] == pytest.approx(probabilities[1], abs=1e-5)


# ---- 2. regression --------------------------------------------------------------------------------------

def test_regression_pearson_and_spearman_equal_scipy_on_peft_predictions(bert, tmp_path, capsys):
    from scipy import stats

    rows = W.similarity_rows(300)
    data = W.write_csv(tmp_path / "sts.csv", ["sentence1", "sentence2", "label"], rows)
    metrics = train(tmp_path / "run", "--model", bert, "--task", "stsb", "--data", data, "--epochs", "4",
                    "--lr", "0.03")
    assert metrics["head"] == "regressor" and metrics["labels"] == []
    assert tuple(adapter_tensors(tmp_path / "run")["base_model.model.classifier.weight"].shape) == (1, W.HIDDEN)

    test_rows = load_task_dataset("stsb", data, **ROWS).test
    assert len(test_rows) == metrics["num_test"] == 30
    truth = {(a, b): score for a, b, score in rows}
    assert all(truth[(e.text, e.text_pair)] == e.label for e in test_rows)  # float labels, read as floats

    model, tokenizer = peft_classifier(bert, tmp_path / "run", 1)
    assert model.config.num_labels == 1 and model.config.problem_type == "regression"
    values = [row[0] for row in pair_logits(model, tokenizer, [(e.text, e.text_pair) for e in test_rows])]
    gold = [e.label for e in test_rows]
    assert len(set(values)) == len(values)  # no ties: ranks are well defined
    # the run scores padded batches, the oracle one unpadded row at a time: values agree to float32 rounding
    assert metrics["test"]["pearson"] == pytest.approx(stats.pearsonr(values, gold)[0], abs=1e-6)
    assert metrics["test"]["spearman"] == pytest.approx(stats.spearmanr(values, gold)[0], abs=1e-9)  # same ranks
    assert metrics["test"]["pearson"] > 0.3  # the model learnt the cue words

    capsys.readouterr()
    assert main(["test", "--checkpoint", str(tmp_path / "run")]) == 0
    assert (f"pearson {stats.pearsonr(values, gold)[0]:.4f}, spearman {stats.spearmanr(values, gold)[0]:.4f} "
            f"over 30 examples") in last_line(capsys)

    out = infer_rows(capsys, tmp_path / "run", f"{test_rows[0].text}\t{test_rows[0].text_pair}")
    assert out[0]["value"] == pytest.approx(values[0], abs=1e-5)


# ---- 3. seq2seq translation -----------------------------------------------------------------------------

def test_translation_bleu_greedy_and_beam_and_infer_equal_sacrebleu_on_peft_generations(t5, tmp_path, capsys):
    import sacrebleu

    rows = W.translation_rows(300)
    data = W.write_jsonl(tmp_path / "trans.jsonl", rows)
    new_tokens = 8
    metrics = train(tmp_path / "run", "--model", t5, "--task", "wmt16-ro-en", "--direction", "ro-en", "--data", data,
                    "--epochs", "6", "--lr", "0.1", "--max-target-length", "8", "--max-new-tokens", str(new_tokens))
    assert metrics["head"] == "seq2seq" and metrics["options"]["direction"] == "ro-en"

    test_rows = load_task_dataset("wmt16-ro-en", data, direction="ro-en", **ROWS).test
    assert len(test_rows) == metrics["num_test"] == 30
    english_of = {row["ro"]: row["en"] for row in rows}
    for e in test_rows:  # ro-en: the source is the Romanian column, the reference the English one
        assert e.text.startswith("ro") and e.target == english_of[e.text]

    model, tokenizer = peft_lm(t5, tmp_path / "run", seq2seq=True)
    sources = [f"translate Romanian to English: {e.text}" for e in test_rows]
    references = [e.target for e in test_rows]
    greedy = [hf_generate(model, tokenizer, s, decoder_only=False, max_new_tokens=new_tokens) for s in sources]
    bleu = sacrebleu.corpus_bleu(greedy, [references]).score
    assert bleu > 0  # some words right: the comparison is not 0 == 0
    assert metrics["test"]["bleu"] == pytest.approx(bleu, abs=1e-9)

    capsys.readouterr()  # `unipeft test` decodes as the run did (its --max-new-tokens) unless told otherwise
    assert main(["test", "--checkpoint", str(tmp_path / "run")]) == 0
    assert f"bleu {bleu:.4f} over 30 examples" in last_line(capsys)

    beam = [hf_generate(model, tokenizer, s, decoder_only=False, max_new_tokens=new_tokens, beams=2) for s in sources]
    beam_bleu = sacrebleu.corpus_bleu(beam, [references]).score
    assert beam != greedy  # beam search is really another decoding here
    assert main(["test", "--checkpoint", str(tmp_path / "run"), "--search", "beam", "--num-beams", "2"]) == 0
    assert f"bleu {beam_bleu:.4f} over 30 examples" in last_line(capsys)

    out = infer_rows(capsys, tmp_path / "run", test_rows[0].text, test_rows[1].text)
    assert [row["generated"] for row in out] == greedy[:2]
    assert any(greedy[:2])


# ---- 4. causal summarization ----------------------------------------------------------------------------

def test_summarization_rouge_equals_rouge_score_on_peft_continuations(gpt2, tmp_path, capsys):
    from rouge_score import rouge_scorer

    rows = W.summary_rows(300)
    data = W.write_jsonl(tmp_path / "docs.jsonl", rows)
    new_tokens = 6
    metrics = train(tmp_path / "run", "--model", gpt2, "--task", "xsum", "--data", data, "--epochs", "4",
                    "--lr", "0.03", "--max-target-length", "8", "--max-new-tokens", str(new_tokens))
    assert metrics["head"] == "causal" and metrics["main_metric"] == "rouge2"

    test_rows = load_task_dataset("xsum", data, **ROWS).test
    assert len(test_rows) == metrics["num_test"] == 30
    summary_of = {row["document"]: row["summary"] for row in rows}
    assert all(summary_of[e.text] == e.target for e in test_rows)

    model, tokenizer = peft_lm(gpt2, tmp_path / "run", seq2seq=False)
    generated = [hf_generate(model, tokenizer, f"Document: {e.text}\nSummary:", decoder_only=True,
                             max_new_tokens=new_tokens) for e in test_rows]
    scorer = rouge_scorer.RougeScorer(["rouge1", "rouge2", "rougeL"], use_stemmer=True)
    scores = [scorer.score(e.target, g) for e, g in zip(test_rows, generated)]
    expected = {kind: 100 * sum(s[kind].fmeasure for s in scores) / len(scores)  # mean F-measure x 100
                for kind in ("rouge1", "rouge2", "rougeL")}
    assert expected["rouge1"] > 0 and expected["rouge2"] > 0
    for kind, value in expected.items():
        assert metrics["test"][kind] == pytest.approx(value, abs=1e-9), kind

    capsys.readouterr()
    assert main(["test", "--checkpoint", str(tmp_path / "run")]) == 0
    assert (f"rouge2 {expected['rouge2']:.4f}, rouge1 {expected['rouge1']:.4f}, rougeL {expected['rougeL']:.4f} "
            f"over 30 examples") in last_line(capsys)

    out = infer_rows(capsys, tmp_path / "run", test_rows[0].text)
    assert out[0]["generated"] == generated[0]


# ---- 5. in-context learning -----------------------------------------------------------------------------

def test_icl_of_the_base_model_equals_a_label_word_scoring_loop(gpt2, tmp_path, capsys):
    rows = W.sentiment_rows(120)
    train_file = W.write_csv(tmp_path / "train.csv", ["sentence", "label"], rows[:80])
    test_file = W.write_csv(tmp_path / "test.csv", ["sentence", "label"], rows[80:])
    capsys.readouterr()
    assert main(["test", "--eval-mode", "icl", "--model", gpt2, "--task", "sst2", "--train-file", train_file,
                 "--test-file", test_file, "--shots", "2"]) == 0
    line = last_line(capsys)

    dataset = load_task_dataset("sst2", train_file=train_file, test_file=test_file, **ROWS)
    assert len(dataset.test) == 40
    demos = pick_demos(dataset.train, 2, 0, 2)  # seed 0 (the default), balanced over the 2 classes
    assert sorted(d.label for d in demos) == [0, 1]
    model, tokenizer = peft_lm(gpt2, None, seq2seq=False)
    accuracy, predictions = sst2_icl_accuracy(model, tokenizer, demos, dataset.test)
    assert len(set(predictions)) == 2  # the prompt matters: not one class for every row
    assert f"accuracy {accuracy:.4f} over 40 examples" in line

    # --data alone: every row is scored, and there is no training split to draw demonstrations from
    assert main(["test", "--eval-mode", "icl", "--model", gpt2, "--task", "sst2", "--data", test_file,
                 "--shots", "2"]) == 2
    assert "--train-file" in capsys.readouterr().err
    assert main(["test", "--eval-mode", "icl", "--model", gpt2, "--task", "sst2", "--data", test_file,
                 "--shots", "0"]) == 0
    zero_shot, _ = sst2_icl_accuracy(model, tokenizer, [], dataset.test)
    assert f"accuracy {zero_shot:.4f} over 40 examples" in last_line(capsys)


def test_icl_training_run_reports_the_accuracy_of_its_adapter_in_context(gpt2, tmp_path, capsys):
    rows = W.sentiment_rows(300)
    data = W.write_csv(tmp_path / "sst.csv", ["sentence", "label"], rows)
    metrics = train(tmp_path / "run", "--model", gpt2, "--task", "sst2", "--data", data, "--eval-mode", "icl",
                    "--shots", "2", "--epochs", "3", "--lr", "0.01")
    assert metrics["head"] == "causal" and metrics["eval_mode"] == "icl"

    dataset = load_task_dataset("sst2", data, **ROWS)
    demos = pick_demos(dataset.train, 2, 1, 2)  # the run's --seed 1
    model, tokenizer = peft_lm(gpt2, tmp_path / "run", seq2seq=False)
    accuracy, predictions = sst2_icl_accuracy(model, tokenizer, demos, dataset.test)
    assert len(set(predictions)) == 2
    assert metrics["test"]["accuracy"] == pytest.approx(accuracy, abs=1e-9)

    capsys.readouterr()  # the saved run in context again: the same demonstrations, the same accuracy
    assert main(["test", "--checkpoint", str(tmp_path / "run")]) == 0
    assert f"accuracy {accuracy:.4f} over {len(dataset.test)} examples" in last_line(capsys)


# ---- 6. resume through the CLI ----------------------------------------------------------------------------

def _evals(run) -> list[dict]:
    return [r for r in map(json.loads, (run / "log.jsonl").read_text().splitlines()) if "eval" in r]


def test_an_interrupted_run_resumed_ends_exactly_as_a_straight_run(bert, tmp_path, monkeypatch, capsys):
    from unipeft.train.task_runner import TaskRunner

    data = W.write_csv(tmp_path / "reviews.csv", ["text", "label"], W.sentiment_rows(120, noise=0.2))
    args = ["--model", bert, "--data", data, "--epochs", "2", "--eval-every", "3", "--lr", "0.03"]
    straight = train(tmp_path / "straight", *args)
    assert straight["steps"] == 12  # 96 rows / 16: 6 steps an epoch

    evaluate, calls = TaskRunner.evaluate, []

    def interrupted(self, model, examples):
        calls.append(len(examples))
        if len(calls) == 2:
            raise KeyboardInterrupt
        return evaluate(self, model, examples)

    monkeypatch.setattr(TaskRunner, "evaluate", interrupted)
    run = tmp_path / "resumed"
    assert main(["train", *args, "--output-dir", str(run), *COMMON]) == 130
    assert "interrupted" in capsys.readouterr().err
    assert (run / "checkpoint").is_dir() and not (run / "metrics.json").exists()
    state = json.loads((run / "checkpoint" / "trainer_state.json").read_text())["state"]
    assert state["step"] == 3  # the evaluation at step 6 never finished: the checkpoint is step 3's
    monkeypatch.setattr(TaskRunner, "evaluate", evaluate)
    # as if interrupted while the next checkpoint replaced this one: only checkpoint.old is left
    (run / "checkpoint").rename(run / "checkpoint.old")

    assert main(["train", *args, "--output-dir", str(run), *COMMON, "--resume"]) == 0
    resumed = json.loads((run / "metrics.json").read_text())
    ours, theirs = adapter_tensors(run), adapter_tensors(tmp_path / "straight")
    assert sorted(ours) == sorted(theirs)
    assert all(torch.equal(ours[name], theirs[name]) for name in ours)
    assert resumed["test"] == straight["test"] and resumed["validation"] == straight["validation"]
    assert (resumed["steps"], resumed["best_step"]) == (straight["steps"], straight["best_step"])
    straight_evals = [(r["step"], r["eval"]) for r in _evals(tmp_path / "straight")]
    assert [(r["step"], r["eval"]) for r in _evals(run)] == straight_evals
    assert [r["step"] for r in _evals(run)] == [3, 6, 9, 12]

    before = W.folder_bytes(run)
    capsys.readouterr()
    assert main(["train", *args, "--output-dir", str(run), *COMMON]) == 2
    assert "already holds a run" in capsys.readouterr().err
    assert W.folder_bytes(run) == before


# ---- 7. options flow ------------------------------------------------------------------------------------

def test_options_reach_the_log_the_schedule_the_best_adapter_and_the_adapter_config(bert, tmp_path, capsys):
    data = W.write_csv(tmp_path / "reviews.csv", ["text", "label"], W.sentiment_rows(200, noise=0.5))
    config = tmp_path / "cfg.json"
    config.write_text(json.dumps({"lora_dropout": 0.1, "target_modules": ["query"]}))
    run = tmp_path / "run"
    lr, warmup_ratio = 0.02, 0.1
    metrics = train(run, "--model", bert, "--data", data, "--epochs", "3", "--lr", str(lr), "--grad-accum", "2",
                    "--schedule", "cosine", "--bf16", "--early-stopping", "1", "--eval-every", "2",
                    "--warmup-ratio", str(warmup_ratio), "--method-config", str(config))
    options = metrics["options"]
    assert (options["grad_accum"], options["schedule"], options["precision"], options["early_stopping"],
            options["eval_every"], options["method_config"]) == (2, "cosine", "bf16", 1, 2, str(config))

    # the learning rate each logged step used: warm-up, then a cosine from lr to 0 over the remaining steps
    assert metrics["num_train"] == 160
    per_epoch = math.ceil(math.ceil(metrics["num_train"] / 16) / 2)  # 160 rows: 10 batches, 5 steps
    total = 3 * per_epoch
    warmup = max(1, math.ceil(total * warmup_ratio))
    records = [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]
    training = [r for r in records if "loss" in r]
    assert training and any(r["step"] > warmup for r in training)
    for r in training:
        k = r["step"] - 1
        factor = (k + 1) / warmup if k < warmup else 0.5 * (1 + math.cos(math.pi * (k - warmup) / (total - warmup)))
        assert r["lr"] == pytest.approx(lr * factor, rel=1e-9, abs=1e-15), r

    # early stopping after one evaluation without a better accuracy, replayed from the log's evaluations
    evals = [r for r in records if "eval" in r]
    assert [r["step"] for r in evals] == list(range(2, 2 * len(evals) + 1, 2))
    best, best_step, stopped = None, None, False
    for i, r in enumerate(evals):
        if best is None or r["eval"]["accuracy"] > best:
            best, best_step = r["eval"]["accuracy"], r["step"]
        else:
            stopped = True
            assert i == len(evals) - 1  # nothing evaluated after the stop
    assert stopped and metrics["stopped_early"] is True
    assert metrics["best_step"] == best_step and metrics["steps"] == evals[-1]["step"] < total
    assert metrics["validation"] == next(r["eval"] for r in evals if r["step"] == best_step)

    # the adapter saved is the best evaluation's, not the last step's
    saved = adapter_tensors(run)
    checkpoint_best = load_file(run / "checkpoint" / "best.safetensors")
    checkpoint_last = load_file(run / "checkpoint" / "trainable.safetensors")
    saved_name = lambda name: name.replace(".default", "").replace("modules_to_save.", "")  # noqa: E731
    assert sorted(map(saved_name, checkpoint_best)) == sorted(saved)
    assert all(torch.equal(saved[saved_name(n)], t) for n, t in checkpoint_best.items())
    assert not all(torch.equal(saved[saved_name(n)], t) for n, t in checkpoint_last.items())

    assert "Best step" in (run / "summary.md").read_text()
    assert (run / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    adapter_config = json.loads((run / "adapter_config.json").read_text())
    assert adapter_config["lora_dropout"] == 0.1 and list(adapter_config["target_modules"]) == ["query"]
    assert {n.split(".")[-3] for n in saved if "lora_" in n} == {"query"}

    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"lora_dropout": 0.1, "lora_dropuot": 0.2}))
    capsys.readouterr()
    assert main(["train", "--model", bert, "--data", data, "--method-config", str(bad),
                 "--output-dir", str(tmp_path / "bad-run"), *COMMON]) == 2
    assert "lora_dropuot" in capsys.readouterr().err
    assert not (tmp_path / "bad-run").exists()
