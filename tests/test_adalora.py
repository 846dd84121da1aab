"""AdaLoRA: HF PEFT interop both ways, the rank schedule step for step against PEFT's, the budget reaching
target_r with masked ranks staying zero, rank_pattern save/reload (pruned files, both libraries), the
Trainer callback, counts, bad input. Section-4 properties run in tests/test_properties.py."""
from __future__ import annotations

import json
import warnings

import peft
import pytest
import torch
import transformers as T
from safetensors.torch import load_file

import families as F
from peft_interop import assert_both_ways
from adapter_checks import randomize, run
from unipeft import AdaLoraCallback, AdaLoraConfig, AdapterError, ConfigError, PeftModel, get_peft_model
from unipeft.methods import adalora

CELLS = [("gpt2", "CAUSAL_LM"), ("bert", "SEQ_CLS"), ("t5", "SEQ_2_SEQ_LM"), ("llama", "CAUSAL_LM")]


def batch_of(family, task):
    """PEFT's AdaLoRA model in inference mode fails when a loss is computed, so seq2seq runs get explicit
    decoder inputs instead of labels."""
    batch = F.make_batch(family, task)
    if family == "t5":
        batch["decoder_input_ids"] = F.make_model(family, task)._shift_right(batch["labels"])
    return batch


def config(task, lib=None, **kwargs):
    kwargs = {"init_r": 6, "target_r": 2, "lora_alpha": 8, "total_step": 12, "tinit": 2, "tfinal": 3, **kwargs}
    return (lib or __import__("unipeft")).AdaLoraConfig(task_type=task, **kwargs)  # randomized by the tests


@pytest.mark.parametrize("family,task", CELLS)
def test_both_ways_with_peft(family, task, tmp_path):
    assert_both_ways(family, task, lambda lib: config(task, lib), tmp_path, batch_of(family, task))


def _step_both(ours, theirs, batch, steps):
    """The same AdamW steps and update_and_allocate calls in both libraries; yields after each step."""
    optimizers = [torch.optim.AdamW([p for p in m.parameters() if p.requires_grad], lr=2e-2) for m in (ours, theirs)]
    for step in range(steps):
        losses = []
        for model, optimizer in zip((ours, theirs), optimizers):
            loss = model(**batch).loss  # the orthogonality penalty is part of the loss in both
            loss.backward()
            optimizer.step()
            model.base_model.update_and_allocate(step)
            optimizer.zero_grad()
            losses.append(loss.item())
        yield step, losses


@pytest.mark.parametrize("family,task,deltaT", [("gpt2", "CAUSAL_LM", 1), ("bert", "SEQ_CLS", 2), ("t5", "SEQ_2_SEQ_LM", 1)])
def test_the_rank_schedule_matches_peft_step_for_step(family, task, deltaT, tmp_path):
    ours = randomize(get_peft_model(F.make_model(family, task), config(task, deltaT=deltaT)))
    ours.save_pretrained(tmp_path)
    theirs = peft.PeftModel.from_pretrained(F.make_model(family, task), tmp_path, is_trainable=True)
    ours = PeftModel.from_pretrained(F.make_model(family, task), tmp_path, is_trainable=True)
    ours.eval(), theirs.eval()  # no dropout: the two runs see the same function
    batch = F.make_batch(family, task)
    patterns = 0
    for step, (our_loss, their_loss) in _step_both(ours, theirs, batch, 12):
        assert our_loss == pytest.approx(their_loss, rel=1e-5, abs=1e-6), step
        expected = theirs.peft_config["default"].rank_pattern
        if expected is not None:
            expected = {k.replace(".default", ""): v for k, v in expected.items()}
            assert ours.peft_config["default"].rank_pattern == expected, step
            patterns += 1
    assert patterns >= 8
    theirs_params = dict(theirs.named_parameters())
    for name, p in ours.named_parameters():
        if p.requires_grad:
            torch.testing.assert_close(p, theirs_params[name], rtol=1e-4, atol=1e-5)


def test_budget_shrinks_to_target_r_and_masked_ranks_stay_zero():
    cfg = config("CAUSAL_LM", init_r=6, target_r=2, total_step=16, tinit=2, tfinal=4)
    model = randomize(get_peft_model(F.make_model("gpt2", "CAUSAL_LM"), cfg))
    layers = adalora._layers(model.base_model, "default")
    batch, optimizer = F.make_batch("gpt2", "CAUSAL_LM"), torch.optim.AdamW(
        [p for p in model.parameters() if p.requires_grad], lr=1e-2)
    budgets = []
    for step in range(16):
        model(**batch).loss.backward()
        optimizer.step()
        model.base_model.update_and_allocate(step)
        optimizer.zero_grad()
        E = {m: layer.lora_E["default"].detach().view(-1) for m, layer in layers.items()}
        budgets.append(sum(int((e != 0).sum()) for e in E.values()))
        pattern = model.peft_config["default"].rank_pattern
        if pattern is not None:  # every dropped triplet is exactly zero right after the step
            assert all(torch.all(E[k.removesuffix(".lora_E")][~torch.tensor(v)] == 0) for k, v in pattern.items())
    assert budgets[:3] == [6 * len(layers)] * 3  # tinit: nothing dropped
    assert all(a >= b for a, b in zip(budgets[2:13], budgets[3:13]))  # non-increasing while reallocating
    assert budgets[12:] == [2 * len(layers)] * 4  # from total_step - tfinal on: target_r per module


def test_rank_pattern_is_saved_pruned_and_reloads_in_both_libraries(tmp_path):
    batch = F.make_batch("gpt2", "CAUSAL_LM")
    model = randomize(get_peft_model(F.make_model("gpt2", "CAUSAL_LM"), config("CAUSAL_LM")))
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    for step in range(12):
        model(**batch).loss.backward()
        optimizer.step()
        model.base_model.update_and_allocate(step)
        optimizer.zero_grad()
    model.eval()
    expected = run(model, batch)
    model.save_pretrained(tmp_path)
    pattern = json.loads((tmp_path / "adapter_config.json").read_text())["rank_pattern"]
    tensors = load_file(tmp_path / "adapter_model.safetensors")
    for key, kept in pattern.items():
        module = key.removesuffix(".lora_E")
        assert tensors[f"base_model.model.{module}.lora_A"].shape[0] == sum(kept) < len(kept)
        assert tensors[f"base_model.model.{module}.lora_B"].shape[1] == sum(kept)
    ours = PeftModel.from_pretrained(F.make_model("gpt2", "CAUSAL_LM"), tmp_path)
    theirs = peft.PeftModel.from_pretrained(F.make_model("gpt2", "CAUSAL_LM"), tmp_path).eval()
    torch.testing.assert_close(run(ours, batch), expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(run(theirs, batch), expected, rtol=1e-5, atol=1e-5)
    theirs.save_pretrained(tmp_path / "again")  # PEFT's own save of the pruned adapter reads back in unipeft
    again = PeftModel.from_pretrained(F.make_model("gpt2", "CAUSAL_LM"), tmp_path / "again")
    torch.testing.assert_close(run(again, batch), expected, rtol=1e-5, atol=1e-5)


class _Rows(torch.utils.data.Dataset):
    def __init__(self, batch):
        self.batch = batch

    def __len__(self):
        return self.batch["input_ids"].shape[0] * 4

    def __getitem__(self, i):
        return {k: v[i % self.batch["input_ids"].shape[0]] for k, v in self.batch.items()}


@pytest.mark.parametrize("with_callback", [True, False])
def test_trainer_callback_runs_the_schedule(with_callback, tmp_path, monkeypatch):
    monkeypatch.setattr(adalora, "UNSCHEDULED_STEPS_WARNING", 3)
    batch = F.make_batch("gpt2", "CAUSAL_LM")
    model = get_peft_model(F.make_model("gpt2", "CAUSAL_LM"), config("CAUSAL_LM", total_step=8, tinit=1, tfinal=2))
    args = T.TrainingArguments(tmp_path, per_device_train_batch_size=2, max_steps=8, learning_rate=1e-2, report_to=[],
                               use_cpu=True, save_strategy="no", logging_strategy="no", disable_tqdm=True)
    trainer = T.Trainer(model=model, args=args, train_dataset=_Rows(batch),
                        callbacks=[AdaLoraCallback()] if with_callback else [])
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer.train()
    pattern = model.peft_config["default"].rank_pattern
    unscheduled = [w for w in caught if "rank schedule never ran" in str(w.message)]
    if with_callback:
        assert [sum(v) for v in pattern.values()] and sum(sum(v) for v in pattern.values()) == 2 * len(pattern)
        assert not unscheduled
    else:
        assert pattern is None and len(unscheduled) == 1


def test_orthogonal_penalty_is_added_to_the_loss():
    batch = F.make_batch("llama", "CAUSAL_LM")
    model = randomize(get_peft_model(F.make_model("llama", "CAUSAL_LM"), config("CAUSAL_LM", orth_reg_weight=0.3)))
    with torch.no_grad():
        with_penalty = model(**batch).loss
        plain = model.get_base_model()(**batch).loss
    grams = []
    for layer in adalora._layers(model.base_model, "default").values():
        A, B = layer.lora_A["default"], layer.lora_B["default"]
        grams += [A @ A.T, B.T @ B]
    penalty = torch.stack([torch.linalg.norm(g - torch.eye(g.shape[0]), "fro") for g in grams]).mean()
    torch.testing.assert_close(with_penalty - plain, 0.3 * penalty, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("name,make", [("bert-base", T.BertConfig), ("gpt2", T.GPT2Config)])
def test_count_is_init_r_triplets_per_layer(name, make):
    c = make()
    d, layers = c.hidden_size, c.num_hidden_layers
    with torch.device("meta"):
        model = T.AutoModel.from_config(c)
        base = sum(p.numel() for p in model.parameters())
        counted = get_peft_model(model, AdaLoraConfig(init_r=12, total_step=10)).get_nb_trainable_parameters()
    # A [r, in], E [r, 1], B [out, r]: query and value (d -> d) / c_attn (d -> 3d)
    per_layer = 2 * 12 * (d + 1 + d) if name == "bert-base" else 12 * (d + 1 + 3 * d)
    assert counted == (layers * per_layer, base + layers * per_layer)


def test_update_and_allocate_after_zero_grad_is_refused_clearly():
    model = get_peft_model(F.make_model("gpt2", "CAUSAL_LM"), config("CAUSAL_LM"))
    model(**F.make_batch("gpt2", "CAUSAL_LM")).loss.backward()
    model.zero_grad(set_to_none=True)
    before = {n: p.clone() for n, p in model.named_parameters() if p.requires_grad}
    with pytest.raises(AdapterError, match="call it after optimizer.step.. and before optimizer.zero_grad"):
        model.base_model.update_and_allocate(5)
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters() if p.requires_grad)


@pytest.mark.parametrize("kwargs,message", [
    (dict(), "needs total_step"), (dict(total_step=0), "needs total_step"),
    (dict(total_step=10, tinit=8, tfinal=2), "leave no steps"), (dict(total_step=10, target_r=16), "target_r <= init_r"),
    (dict(total_step=10, use_dora=True), "does not support use_dora"), (dict(total_step=10, deltaT=0), "deltaT >= 1"),
])
def test_bad_config(kwargs, message):
    with pytest.raises(ConfigError, match=message):
        AdaLoraConfig(**kwargs)
