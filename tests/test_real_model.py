"""A real pretrained model on real data: all-MiniLM-L6-v2 + LoRA on the embedded tweet-sentiment corpus.

Brief training (1,200 tweets, 2 epochs) must beat the majority class on held-out tweets by a clear
margin, and the saved adapter must give the same predictions when loaded back by unipeft and by
Hugging Face PEFT. About 100 s on one core (conftest.py runs torch on one thread per worker).
"""
from __future__ import annotations

import pytest
import torch

import unipeft
from unipeft.train import data as train_data
from unipeft.train.model import default_model_path
from unipeft.train.plan import TrainOptions
from unipeft.train.run import run

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    options = TrainOptions(max_train_samples=1200, max_eval_samples=600, epochs=2, batch_size=32, lr=1e-3,
                           output_dir=str(tmp_path_factory.mktemp("minilm") / "adapter"), progress=False)
    lines: list[str] = []
    metrics = run(options, log=lines.append)
    return options, metrics, lines


def test_lora_beats_majority_class_on_held_out_tweets(trained):
    options, metrics, lines = trained
    assert metrics["labels"] == ["negative", "neutral", "positive"]
    assert metrics["num_train"] == 1200 and metrics["num_test"] == 600
    assert 0.3 < metrics["majority_baseline"] < 0.5  # the corpus is ~42% negative
    assert metrics["test_accuracy"] >= metrics["majority_baseline"] + 0.10, lines
    # LoRA r=8 on query and value of 6 layers (384 wide) plus the 3-way classifier head
    assert metrics["trainable_params"] == 6 * 2 * 2 * 8 * 384 + 384 * 3 + 3
    held_out = train_data.load_dataset(split_seed=options.split_seed, max_eval_samples=options.max_eval_samples)
    assert not {e.text for e in held_out.train} & {e.text for e in held_out.test}


def _logits(model, tokenizer, texts, max_length):
    batch = tokenizer(texts, padding=True, truncation=True, max_length=max_length, return_tensors="pt")
    with torch.no_grad():
        return model(**batch).logits


def _base(num_labels):
    from transformers import AutoModelForSequenceClassification

    return AutoModelForSequenceClassification.from_pretrained(default_model_path(), num_labels=num_labels)


def test_saved_adapter_reproduces_accuracy_in_unipeft_and_hf_peft(trained):
    import peft
    from transformers import AutoTokenizer

    options, metrics, _ = trained
    dataset = train_data.load_dataset(split_seed=options.split_seed, max_eval_samples=options.max_eval_samples)
    tokenizer = AutoTokenizer.from_pretrained(default_model_path())
    texts, labels = [e.text for e in dataset.test], torch.tensor([e.label for e in dataset.test])

    step = options.batch_size  # the run's batches, so padding and hence every float is the same
    ours = unipeft.PeftModel.from_pretrained(_base(3), options.output_dir).eval()
    logits = torch.cat([_logits(ours, tokenizer, texts[i:i + step], options.max_length) for i in range(0, len(texts), step)])
    assert (logits.argmax(-1) == labels).sum().item() == round(metrics["test_accuracy"] * len(texts))

    theirs = peft.PeftModel.from_pretrained(_base(3), options.output_dir).eval()
    first = _logits(theirs, tokenizer, texts[:step], options.max_length)
    torch.testing.assert_close(first, logits[:step], atol=1e-5, rtol=1e-5)
