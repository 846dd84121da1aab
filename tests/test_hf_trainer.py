"""A unipeft model trains under transformers.Trainer and Seq2SeqTrainer with their default arguments."""
from __future__ import annotations

import pytest
import torch
import transformers as T

import families as F
from unipeft import LoraConfig, PeftModel, PrefixTuningConfig, get_peft_model


class Rows(torch.utils.data.Dataset):
    """The tiny batch's rows, repeated: a dataset whose columns Trainer must keep."""

    def __init__(self, batch: dict, repeat: int = 4):
        self.batch, self.n = batch, batch["input_ids"].shape[0]
        self.repeat = repeat

    def __len__(self):
        return self.n * self.repeat

    def __getitem__(self, i):
        return {k: v[i % self.n] for k, v in self.batch.items()}


def train_with(trainer_cls, model, batch, tmp_path, **extra):
    args_cls = T.Seq2SeqTrainingArguments if trainer_cls is T.Seq2SeqTrainer else T.TrainingArguments
    args = args_cls(tmp_path, per_device_train_batch_size=2, max_steps=6, learning_rate=5e-3, report_to=[], use_cpu=True,
                    save_strategy="no", logging_strategy="no", disable_tqdm=True, **extra)
    trainer = trainer_cls(model=model, args=args, train_dataset=Rows(batch), eval_dataset=Rows(batch, 1))
    trainer.train()
    return trainer


@pytest.mark.parametrize("trainer_cls,family,task,config", [
    (T.Trainer, "llama", "CAUSAL_LM", LoraConfig(task_type="CAUSAL_LM", r=4)),
    (T.Trainer, "bert", "SEQ_CLS", LoraConfig(task_type="SEQ_CLS", r=4)),
    (T.Seq2SeqTrainer, "t5", "SEQ_2_SEQ_LM", LoraConfig(task_type="SEQ_2_SEQ_LM", r=4)),
    (T.Seq2SeqTrainer, "bart", "SEQ_2_SEQ_LM", PrefixTuningConfig(task_type="SEQ_2_SEQ_LM", num_virtual_tokens=4)),
])
def test_trainer_trains_only_the_adapter_and_the_result_reloads(trainer_cls, family, task, config, tmp_path):
    batch = F.make_batch(family, task)
    model = get_peft_model(F.make_model(family, task), config)
    model.eval()
    with torch.no_grad():
        before = model(**batch).loss.item()
    frozen = {n: p.clone() for n, p in model.named_parameters() if not p.requires_grad}
    trainer = train_with(trainer_cls, model, batch, tmp_path)
    model.eval()
    with torch.no_grad():
        after = model(**batch).loss.item()
    assert after < before
    assert all(torch.equal(p, frozen[n]) for n, p in model.named_parameters() if n in frozen)
    if trainer_cls is T.Seq2SeqTrainer:  # generation inside the trainer's evaluation loop
        trainer.args.predict_with_generate, trainer.args.generation_max_length = True, 5
        assert trainer.predict(Rows(batch, 1)).predictions.shape[0] == batch["input_ids"].shape[0]
    model.save_pretrained(tmp_path / "adapter")
    loaded = PeftModel.from_pretrained(F.make_model(family, task), tmp_path / "adapter")
    with torch.no_grad():
        torch.testing.assert_close(loaded(**batch).logits, model(**batch).logits, rtol=1e-5, atol=1e-5)
