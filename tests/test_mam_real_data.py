"""MAM at He et al.'s sizes learns on real data: all-MiniLM-L6-v2 and the embedded tweet corpus.

The paper's MAM (prefix l = 30 from an 800-wide MLP at every attention, parallel FFN adapter r = hidden/2 with
scale 4) at the adapters' learning rate (1e-3) used to lose its input: the MLP moved the prefix so fast that
it took the attention over and the loss settled at the label prior (about 1.04 nats here). It must now learn:
the loss falls well below the prior and the held-out accuracy clears the majority class by a clear margin.
About 3 minutes on one core.
"""
from __future__ import annotations

import math

import pytest
import torch

import unipeft
from unipeft.train import data as train_data
from unipeft.train.model import default_model_path

pytestmark = pytest.mark.slow

STEPS, BATCH, LR, WARMUP = 120, 16, 1e-3, 8


def _encode(tokenizer, examples):
    batch = tokenizer([e.text for e in examples], padding=True, truncation=True, max_length=64, return_tensors="pt")
    return batch, torch.tensor([e.label for e in examples])


def test_mam_at_the_papers_sizes_learns_on_held_out_tweets():
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    data = train_data.load_dataset(max_train_samples=STEPS * BATCH, max_eval_samples=400)
    tokenizer = AutoTokenizer.from_pretrained(default_model_path())
    torch.manual_seed(0)
    base = AutoModelForSequenceClassification.from_pretrained(default_model_path(), num_labels=len(data.labels))
    hidden = base.config.hidden_size
    model = unipeft.get_peft_model(base, unipeft.MAMConfig(task_type="SEQ_CLS", ffn_bn=hidden // 2))
    assert (model.peft_config["default"].attn_bn, model.peft_config["default"].mid_dim) == (30, 800)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=LR)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: min(1.0, (s + 1) / WARMUP, (STEPS - s) / (STEPS - WARMUP)))
    model.train()
    losses = []
    for step in range(STEPS):
        batch, labels = _encode(tokenizer, data.train[step * BATCH:(step + 1) * BATCH])
        loss = model(**batch, labels=labels).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        schedule.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    model.eval()
    with torch.no_grad():
        batch, labels = _encode(tokenizer, data.test)
        accuracy = (model(**batch).logits.argmax(-1) == labels).float().mean().item()
    shares = [sum(e.label == c for e in data.train) / len(data.train) for c in range(len(data.labels))]
    prior = -sum(p * math.log(p) for p in shares)  # the loss of a model that has lost its input
    first, last = sum(losses[:30]) / 30, sum(losses[-30:]) / 30
    assert last < prior - 0.1 and last < first - 0.1, (prior, first, last)
    majority = max(sum(e.label == c for e in data.test) for c in range(len(data.labels))) / len(data.test)
    assert accuracy >= majority + 0.12, (accuracy, majority)
