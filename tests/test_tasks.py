"""The task registry and its loader: local files, and the Hub through a fake `datasets.load_dataset`."""
import json
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

import datasets  # noqa: E402
import pytest  # noqa: E402

from unipeft.train import data, tasks  # noqa: E402
from unipeft.train.data import Example  # noqa: E402
from unipeft.train.errors import UsageError  # noqa: E402
from unipeft.train.metrics import GREATER_IS_BETTER  # noqa: E402
from unipeft.train.task_data import load_task_dataset  # noqa: E402
from unipeft.train.tasks import get_task, known_tasks, task_for  # noqa: E402


def write(path, rows, sep=","):
    """A CSV/TSV (sep) or JSONL (path ends .jsonl) file of dict rows."""
    if str(path).endswith(".jsonl"):
        path.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    else:
        columns = list(rows[0])
        lines = [sep.join(columns)] + [sep.join(str(row[c]) for c in columns) for row in rows]
        path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return str(path)


# ---- the registry ----

def test_registry_names_metrics_and_hub_ids():
    expected = {
        "tweets": ("accuracy", None), "cola": ("matthews", "nyu-mll/glue"), "sst2": ("accuracy", "nyu-mll/glue"),
        "mrpc": ("f1", "nyu-mll/glue"), "qqp": ("f1", "nyu-mll/glue"), "stsb": ("pearson", "nyu-mll/glue"),
        "mnli": ("accuracy", "nyu-mll/glue"), "mnli-10pct": ("accuracy", "nyu-mll/glue"),
        "qnli": ("accuracy", "nyu-mll/glue"), "rte": ("accuracy", "nyu-mll/glue"), "wnli": ("accuracy", "nyu-mll/glue"),
        "xsum": ("rouge2", "EdinburghNLP/xsum"), "cnn_dailymail": ("rouge2", "abisee/cnn_dailymail"),
        "wmt16-ro-en": ("bleu", "wmt/wmt16"), "blended_skill_talk": ("bleu", "ParlAI/blended_skill_talk"),
    }
    assert set(known_tasks()) == set(expected)
    for name, (main, hub) in expected.items():
        task = get_task(name)
        assert (task.metrics[0], task.hub_path) == (main, hub), name
        assert all(m in GREATER_IS_BETTER for m in task.metrics)
        assert task.greater_is_better is True
        assert not task.prompt_template.endswith(" ")
        if task.kind == "classification" and task.labels:
            assert len(task.label_words) == len(task.labels), name
        if task.hub_path == "nyu-mll/glue":
            assert task.hub_config == name.replace("-10pct", "")
    assert get_task("blended_skill_talk").metrics == ("bleu", "rougeL", "perplexity")
    assert get_task("cnn_dailymail").hub_config == "3.0.0"


def test_glue_label_orders_match_the_hub():
    assert get_task("cola").labels == ("unacceptable", "acceptable")
    assert get_task("sst2").labels == ("negative", "positive")
    assert get_task("mrpc").labels == ("not_equivalent", "equivalent")
    assert get_task("qqp").labels == ("not_duplicate", "duplicate")
    assert get_task("mnli").labels == ("entailment", "neutral", "contradiction")
    assert get_task("qnli").labels == ("entailment", "not_entailment")
    assert get_task("rte").labels == ("entailment", "not_entailment")
    assert get_task("wnli").labels == ("not_entailment", "entailment")
    assert get_task("stsb").kind == "regression" and get_task("stsb").labels == ()


def test_unknown_task_lists_the_known_ones():
    with pytest.raises(UsageError, match=r"unknown task 'sst-2'; known tasks: tweets, cola, sst2, .*wmt16-ro-en"):
        get_task("sst-2")


def test_task_for_defaults():
    assert task_for(None, None).name == "tweets"
    assert task_for(None, "file.csv") is tasks.FILE_TASK
    assert task_for("rte", "file.csv").name == "rte"


def test_prompt_answer_source_of_a_pair_task():
    task = get_task("mrpc")
    example = Example("The cat sat.", 1, text_pair="A cat was sitting.")
    assert task.prompt(example) == "Sentence 1: The cat sat.\nSentence 2: A cat was sitting.\nSame meaning:"
    assert task.answer(example) == " yes"
    assert task.answer(Example("a", 0, text_pair="b")) == " no"
    assert task.source(example) == "mrpc: The cat sat. A cat was sitting."
    with pytest.raises(ValueError, match="regression"):
        get_task("stsb").answer(Example("a", 3.2, text_pair="b"))


def test_prompt_answer_source_of_generation_tasks():
    xsum = get_task("xsum")
    example = Example("Storms hit the coast on Monday.", target="Storms hit.")
    assert xsum.prompt(example) == "Document: Storms hit the coast on Monday.\nSummary:"
    assert xsum.answer(example) == " Storms hit."
    assert xsum.source(example) == "summarize: Storms hit the coast on Monday."
    wmt = get_task("wmt16-ro-en")
    assert wmt.prompt(Example("Hello", target="Salut")) == "English: Hello\nRomanian:"
    assert wmt.source(Example("Hello", target="Salut")) == "translate English to Romanian: Hello"
    back = get_task("wmt16-ro-en", direction="ro-en")
    assert (back.text_column, back.target_column) == ("ro", "en")
    assert back.prompt(Example("Salut", target="Hello")) == "Romanian: Salut\nEnglish:"
    assert back.source(Example("Salut", target="Hello")) == "translate Romanian to English: Salut"
    with pytest.raises(UsageError, match="en-ro or ro-en"):
        get_task("wmt16-ro-en", direction="en-de")
    with pytest.raises(UsageError, match="translation tasks"):
        get_task("sst2", direction="en-ro")


# ---- local files ----

def nli_rows(n):
    return [{"sentence1": f"premise {i}", "sentence2": f"hypothesis {i}",
             "label": ["entailment", "not_entailment", "0", "1"][i % 4]} for i in range(n)]


def test_pair_task_from_one_file_maps_label_names_and_ids(tmp_path):
    path = write(tmp_path / "rte.csv", nli_rows(40) + [nli_rows(1)[0]])  # the last row repeats the first
    dataset = load_task_dataset("rte", path, split_seed=3)
    assert (len(dataset.train), len(dataset.validation), len(dataset.test)) == (32, 4, 4)
    assert dataset.labels == ["entailment", "not_entailment"]
    by_text = {e.text: e for e in dataset.train + dataset.validation + dataset.test}
    assert by_text["premise 0"] == Example("premise 0", 0, text_pair="hypothesis 0")  # "entailment"
    assert by_text["premise 1"].label == 1  # "not_entailment"
    assert by_text["premise 2"].label == 0 and by_text["premise 3"].label == 1  # "0", "1"
    assert any("repeated" in note for note in dataset.notes)
    again = load_task_dataset("rte", path, split_seed=3)
    assert again.test == dataset.test
    assert load_task_dataset("rte", path, split_seed=4).test != dataset.test


def test_regression_labels_are_floats(tmp_path):
    rows = [{"sentence1": f"a {i}", "sentence2": f"b {i}", "label": i / 4} for i in range(20)]
    dataset = load_task_dataset("stsb", write(tmp_path / "stsb.tsv", rows, sep="\t"))
    values = sorted(e.label for e in dataset.train + dataset.validation + dataset.test)
    assert values == [i / 4 for i in range(20)]
    assert dataset.labels == []
    bad = rows[:5] + [{"sentence1": "x", "sentence2": "y", "label": "high"}]
    with pytest.raises(UsageError, match=r"numeric labels.*\['high'\]"):
        load_task_dataset("stsb", write(tmp_path / "bad.tsv", bad, sep="\t"))


def test_translation_both_directions_and_renamed_columns(tmp_path):
    rows = [{"en": f"hello {i}", "ro": f"salut {i}"} for i in range(20)]
    path = write(tmp_path / "wmt.jsonl", rows)
    forward = load_task_dataset("wmt16-ro-en", path)
    backward = load_task_dataset("wmt16-ro-en", path, direction="ro-en")
    for example in forward.train:
        assert example.target == example.text.replace("hello", "salut")
    for example in backward.train:
        assert example.target == example.text.replace("salut", "hello")
    assert forward.labels == [] and forward.train[0].label is None
    renamed = write(tmp_path / "pairs.csv", [{"source": r["en"], "target": r["ro"]} for r in rows])
    dataset = load_task_dataset("wmt16-ro-en", renamed, text_column="source", target_column="target")
    assert {(e.text, e.target) for e in dataset.test} <= {(r["en"], r["ro"]) for r in rows}


def test_dialogue_file_drops_empty_rows(tmp_path):
    rows = [{"context": f"Hi {i}\nHow are you?", "response": f"Fine {i}"} for i in range(10)]
    rows.append({"context": "Anyone there?", "response": ""})
    dataset = load_task_dataset("blended_skill_talk", write(tmp_path / "chat.jsonl", rows))
    examples = dataset.train + dataset.validation + dataset.test
    assert len(examples) == 10
    assert Example("Hi 3\nHow are you?", target="Fine 3") in examples
    assert any("dropped 1 row(s) with an empty text or target" in note for note in dataset.notes)
    example = Example("Hi\nHow are you?", target="Fine")
    assert get_task("blended_skill_talk").prompt(example) == "Dialogue:\nHi\nHow are you?\nReply:"
    assert get_task("blended_skill_talk").answer(example) == " Fine"


def test_explicit_train_validation_test_files(tmp_path):
    def sst_rows(prefix, n):
        return [{"sentence": f"{prefix} {i}", "label": i % 2} for i in range(n)]

    train = write(tmp_path / "train.csv", sst_rows("train", 30))
    validation = write(tmp_path / "dev.csv", sst_rows("dev", 6))
    test = write(tmp_path / "test.jsonl", sst_rows("test", 5))
    dataset = load_task_dataset("sst2", train_file=train, validation_file=validation, test_file=test)
    assert [len(dataset.train), len(dataset.validation), len(dataset.test)] == [30, 6, 5]
    assert dataset.test[0] == Example("test 0", 0)
    assert dataset.labels == ["negative", "positive"]

    # train + validation: the validation file is the test split; validation is 10% of the train file
    dataset = load_task_dataset("sst2", train_file=train, validation_file=validation)
    assert [e.text for e in dataset.test] == [f"dev {i}" for i in range(6)]
    assert len(dataset.validation) == 3 and len(dataset.train) == 27
    assert not {e.text for e in dataset.validation} & {e.text for e in dataset.train}

    # a test file alone: every row is the test split
    dataset = load_task_dataset("sst2", test_file=test)
    assert (dataset.train, dataset.validation, len(dataset.test)) == ([], [], 5)

    small = load_task_dataset("sst2", train_file=train, test_file=test, max_train_samples=7, max_eval_samples=2)
    assert (len(small.train), len(small.validation), len(small.test)) == (7, 2, 2)
    assert small.train == load_task_dataset("sst2", train_file=train, test_file=test, max_train_samples=7).train


def test_missing_column_names_the_file_the_columns_and_the_flag(tmp_path):
    path = write(tmp_path / "mrpc.csv", [{"sentence1": "a", "second": "b", "label": 1}] * 3)
    with pytest.raises(UsageError) as error:
        load_task_dataset("mrpc", path)
    message = str(error.value)
    assert "no pair column 'sentence2'" in message and path in message
    assert "['sentence1', 'second', 'label']" in message and "--pair-column" in message
    dataset = load_task_dataset("mrpc", write(tmp_path / "ok.csv", [
        {"sentence1": f"a{i}", "second": "b", "label": 1} for i in range(5)]), pair_column="second")
    assert dataset.train[0].text_pair == "b"
    with pytest.raises(UsageError, match="no target column 'summary'.*--target-column"):
        load_task_dataset("xsum", write(tmp_path / "doc.csv", [{"document": "d", "abstract": "s"}]))


def test_unknown_label_lists_unknown_and_known(tmp_path):
    rows = nli_rows(8) + [{"sentence1": "p", "sentence2": "h", "label": "maybe"},
                          {"sentence1": "q", "sentence2": "h", "label": "2"}]
    with pytest.raises(UsageError, match=r"unknown label\(s\) \['2', 'maybe'\].*entailment \(0\), not_entailment \(1\)"):
        load_task_dataset("rte", write(tmp_path / "rte.csv", rows))
    with pytest.raises(UsageError, match="unknown label"):  # checked before subsampling
        load_task_dataset("rte", str(tmp_path / "rte.csv"), max_train_samples=1, max_eval_samples=1)


def test_bad_file_combinations(tmp_path):
    path = write(tmp_path / "a.csv", nli_rows(8))
    with pytest.raises(UsageError, match="not both"):
        load_task_dataset("rte", path, train_file=path)
    with pytest.raises(UsageError, match="--validation-file needs --train-file"):
        load_task_dataset("rte", validation_file=path)


def test_tweets_matches_data_load_dataset():
    expected = data.load_dataset(None, split_seed=2, max_train_samples=500, max_eval_samples=100)
    got = load_task_dataset("tweets", split_seed=2, max_train_samples=500, max_eval_samples=100)
    assert (got.train, got.validation, got.test, got.labels) == (
        expected.train, expected.validation, expected.test, expected.labels)
    assert got.labels == ["negative", "neutral", "positive"]  # the order tweets' label words follow
    assert get_task("tweets").answer(got.train[0]) == " " + got.labels[got.train[0].label]


def test_file_without_task_matches_data_load_dataset(tmp_path):
    rows = [{"text": f"text {i}", "label": ["pos", "neg", "neu"][i % 3]} for i in range(50)]
    path = write(tmp_path / "mine.csv", rows)
    expected = data.load_dataset(path, split_seed=1, max_train_samples=10)
    got = load_task_dataset(task_for(None, path), path, split_seed=1, max_train_samples=10)
    assert (got.train, got.validation, got.test, got.labels) == (
        expected.train, expected.validation, expected.test, expected.labels)


# ---- the Hub, faked ----

class FakeHub:
    """Stands in for datasets.load_dataset: records the call, returns a DatasetDict with the real layout."""

    def __init__(self, splits):
        self.splits, self.calls = splits, []

    def __call__(self, path, name=None, **kwargs):
        self.calls.append((path, name, kwargs.get("revision")))
        return datasets.DatasetDict({k: datasets.Dataset.from_dict(v) for k, v in self.splits.items()})


def glue_pair(prefix, n, classes=2):
    return {"premise": [f"{prefix} p{i}" for i in range(n)], "hypothesis": [f"{prefix} h{i}" for i in range(n)],
            "label": [i % classes for i in range(n)], "idx": list(range(n))}


@pytest.fixture
def fake_hub(monkeypatch):
    def install(splits):
        hub = FakeHub(splits)
        monkeypatch.setattr(datasets, "load_dataset", hub)
        return hub
    return install


def test_glue_test_is_the_hub_validation_and_validation_is_carved_from_train(fake_hub):
    hub = fake_hub({
        "train": {"sentence": [f"train {i}" for i in range(50)], "label": [i % 2 for i in range(50)],
                  "idx": list(range(50))},
        "validation": {"sentence": [f"val {i}" for i in range(8)], "label": [1] * 8, "idx": list(range(8))},
        "test": {"sentence": [f"test {i}" for i in range(8)], "label": [-1] * 8, "idx": list(range(8))},
    })
    dataset = load_task_dataset("sst2", split_seed=5)
    assert hub.calls == [("nyu-mll/glue", "sst2", None)]
    assert [e.text for e in dataset.test] == [f"val {i}" for i in range(8)]
    assert len(dataset.validation) == 5 and len(dataset.train) == 45  # 10% of 50 held out
    train, validation = {e.text for e in dataset.train}, {e.text for e in dataset.validation}
    assert not train & validation and train | validation == {f"train {i}" for i in range(50)}
    assert Example("train 3", 1) in dataset.train + dataset.validation
    assert dataset.labels == ["negative", "positive"] and dataset.extra == {}
    assert load_task_dataset("sst2", split_seed=5).validation == dataset.validation
    assert load_task_dataset("sst2", split_seed=6).validation != dataset.validation
    small = load_task_dataset("sst2", split_seed=5, max_train_samples=10, max_eval_samples=3)
    assert (len(small.train), len(small.validation), len(small.test)) == (10, 3, 3)
    assert set(small.train) <= set(dataset.train)
    assert small.train == load_task_dataset("sst2", split_seed=5, max_train_samples=10).train


def test_mnli_extra_split_and_the_10pct_train(fake_hub):
    hub = fake_hub({"train": glue_pair("train", 200, 3), "validation_matched": glue_pair("matched", 6, 3),
                    "validation_mismatched": glue_pair("mismatched", 7, 3), "test_matched": glue_pair("t", 2, 3)})
    dataset = load_task_dataset("mnli")
    assert hub.calls[-1][:2] == ("nyu-mll/glue", "mnli")
    assert [e.text for e in dataset.test] == [f"matched p{i}" for i in range(6)]
    assert list(dataset.extra) == ["validation_mismatched"]
    assert dataset.extra["validation_mismatched"][2] == Example("mismatched p2", 2, text_pair="mismatched h2")
    assert (len(dataset.train), len(dataset.validation)) == (180, 20)
    tenth = load_task_dataset("mnli-10pct")
    assert hub.calls[-1][:2] == ("nyu-mll/glue", "mnli")
    assert len(tenth.train) == 18 and set(tenth.train) <= set(dataset.train)  # 10% of the 180 left after carving
    assert tenth.validation == dataset.validation and tenth.test == dataset.test


def test_stsb_hub_labels_are_floats(fake_hub):
    fake_hub({"train": {"sentence1": ["a", "b", "c"], "sentence2": ["x", "y", "z"], "label": [0.0, 2.5, 5.0]},
              "validation": {"sentence1": ["d"], "sentence2": ["w"], "label": [3.8]}})
    dataset = load_task_dataset("stsb")
    assert dataset.test == [Example("d", 3.8, text_pair="w")]
    assert sorted(e.label for e in dataset.train + dataset.validation) == [0.0, 2.5, 5.0]


def test_wmt16_nested_translations_both_directions(fake_hub):
    def pairs(n, tag):
        return {"translation": [{"en": f"{tag} hello {i}", "ro": f"{tag} salut {i}"} for i in range(n)]}

    hub = fake_hub({"train": pairs(10, "tr"), "validation": pairs(3, "va"), "test": pairs(4, "te")})
    forward = load_task_dataset("wmt16-ro-en")
    assert hub.calls[-1] == ("wmt/wmt16", "ro-en", None)
    assert forward.test[0] == Example("te hello 0", target="te salut 0")
    assert (len(forward.train), len(forward.validation), len(forward.test)) == (10, 3, 4)
    backward = load_task_dataset("wmt16-ro-en", direction="ro-en")
    assert backward.test[0] == Example("te salut 0", target="te hello 0")


def test_xsum_reads_the_parquet_export(fake_hub):
    hub = fake_hub({name: {"document": [f"{name} doc {i}" for i in range(3)], "summary": [f"sum {i}" for i in range(3)],
                           "id": ["1", "2", "3"]} for name in ("train", "validation", "test")})
    dataset = load_task_dataset("xsum")
    assert hub.calls == [("EdinburghNLP/xsum", None, "refs/convert/parquet")]
    assert dataset.validation[1] == Example("validation doc 1", target="sum 1")


def test_blended_skill_talk_turns_become_context_and_reply(fake_hub):
    dialogue = {"personas": [["p1", "p2"]], "additional_context": [""],
                "previous_utterance": [["seed one", "seed two"]], "context": ["empathetic_dialogues"],
                "free_messages": [["free one", "free two"]], "guided_messages": [["guided one", "guided two"]],
                "suggestions": [{"convai2": ["s"], "empathetic_dialogues": ["s"], "wizard_of_wikipedia": ["s"]}],
                "guided_chosen_suggestions": [["", ""]], "label_candidates": [[]]}
    hub = fake_hub({"train": dialogue, "validation": dialogue, "test": dialogue})
    dataset = load_task_dataset("blended_skill_talk")
    assert hub.calls == [("ParlAI/blended_skill_talk", None, None)]
    # turns: seed one, seed two, free one, guided one, free two, guided two; history of at most 3 turns
    assert dataset.test == [
        Example("seed one\nseed two", target="free one"),
        Example("seed one\nseed two\nfree one", target="guided one"),
        Example("seed two\nfree one\nguided one", target="free two"),
        Example("free one\nguided one\nfree two", target="guided two"),
    ]
    assert len(load_task_dataset("blended_skill_talk", max_train_samples=2).train) == 2


def test_hub_unreachable_says_how_to_work_offline(monkeypatch):
    def offline(*args, **kwargs):
        raise ConnectionError("Couldn't reach 'nyu-mll/glue' on the Hub (OfflineModeIsEnabled)")

    monkeypatch.setattr(datasets, "load_dataset", offline)
    with pytest.raises(UsageError, match=r"cannot download task rte .*offline, pass --data FILE "
                                         r"\(columns: sentence1, sentence2, label\)"):
        load_task_dataset("rte")


def test_real_loader_offline_is_a_usage_error():
    assert datasets.config.HF_HUB_OFFLINE  # set at the top of this file, before datasets was imported
    with pytest.raises(UsageError, match="cannot download task wnli"):
        load_task_dataset("wnli")
