"""The DESIGN.md section-4 properties, for every method of the capability table (tests/capabilities.py) on
every (family, task) cell of `families.MATRIX` it supports.

Expected values come from outside the code under test: the untouched base model, hand formulas over HF PEFT's
default-target tables, a greedy loop of plain forward passes, or a second unipeft path that must agree with
the first (the merged model, each row of a mixed batch run alone). Each test is tagged with `@covers(n)`
(its DESIGN.md number); `support_matrix.py` reads the tags and the table to render the README matrices.
Method-specific oracles (LoRA's exact checkpoint layout and merge formula, the prompt fed by hand, where a
bottleneck adapter reads and writes) live in each method's own test file.
"""
from __future__ import annotations

import copy
import math
import re

import pytest
import torch
from safetensors.torch import load_file

import families as F
from adapter_checks import (
    ADAPTER_MARKERS, BASE, assert_merge_round_trip, base_tensors, covers, forward_for_loss, greedy_by_forward, is_adapter_param,
    loss_of, randomize, rows, run, run_as, train,
)
from capabilities import GENERATIVE_TASKS, METHODS, cells, head_paths, make, params
from peft_interop import assert_both_ways
from unipeft import AdapterError, PeftModel, get_peft_model


def fresh(method: str, family: str, task: str):
    return get_peft_model(F.make_model(family, task), METHODS[method].build(task))


def differs(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.shape != b.shape or not torch.allclose(a, b, atol=1e-4)


# ---- 1-4: what trains, identity, training, save/load ---------------------------------------------------
@covers(1)
@params(cells())
def test_only_adapter_trains_and_base_is_bit_identical(method, family, task):
    peft = fresh(method, family, task)
    trainable = {n for n, p in peft.named_parameters() if p.requires_grad}
    assert trainable and all(is_adapter_param(n) for n in trainable)
    frozen = {n: p.detach().clone() for n, p in peft.named_parameters() if not p.requires_grad}
    initial = {n: p.detach().clone() for n, p in peft.named_parameters() if p.requires_grad}
    peft.train()
    train(peft, task, F.make_batch(family, task), steps=3)
    assert all(torch.equal(p, frozen[n]) for n, p in peft.named_parameters() if n in frozen)
    unchanged = [n for n, p in peft.named_parameters() if n in initial and torch.equal(p, initial[n])]
    assert not unchanged, f"adapter tensors that did not train: {unchanged[:3]}"


@covers(2)
@params(cells(where=lambda m: m.identity_at_init))
def test_identity_at_init(method, family, task):
    batch = F.make_batch(family, task)
    base = run(F.make_model(family, task), batch)
    peft = fresh(method, family, task)
    heads = head_paths(peft.get_base_model(), task)  # a head copy runs the same weights through another module
    torch.testing.assert_close(run(peft, batch), base, rtol=0, atol=1e-6 if heads else 0)


@covers(3)
@params(cells())
def test_training_reduces_loss(method, family, task):
    batch = F.make_batch(family, task)
    if task == "SEQ_CLS":  # one class: reachable even where the pooled position is a virtual token (BERT)
        batch["labels"] = torch.zeros_like(batch["labels"])
    losses = train(fresh(method, family, task), task, batch, steps=5)
    assert all(math.isfinite(x) for x in losses)
    assert losses[-1] < losses[0]


@covers(4)
@params(cells())
def test_save_load_round_trip(method, family, task, tmp_path):
    peft = make(method, family, task)
    batch = F.make_batch(family, task)
    expected = run(peft, batch)
    assert differs(expected, run(F.make_model(family, task), batch))
    peft.save_pretrained(tmp_path)
    keys = set(load_file(tmp_path / "adapter_model.safetensors"))
    heads = head_paths(peft.get_base_model(), task)
    base_keys = {k for k in F.make_model(family, task).state_dict() if not any(k.startswith(h + ".") for h in heads)}
    assert keys and not any(k.removeprefix("base_model.model.") in base_keys for k in keys), "base tensors saved"
    for name in ("default", "other"):
        loaded = PeftModel.from_pretrained(F.make_model(family, task), tmp_path, adapter_name=name)
        assert loaded.active_adapter == name and list(loaded.peft_config) == [name]
        torch.testing.assert_close(run(loaded, batch), expected, rtol=0, atol=1e-6)


# ---- 5: merge ------------------------------------------------------------------------------------------
@covers(5)
@params(cells(where=lambda m: m.mergeable))
def test_merge_unmerge_and_unload_agree(method, family, task):
    assert_merge_round_trip(make(method, family, task), F.make_batch(family, task))


@covers(5)
@pytest.mark.parametrize("poison", [math.inf, math.nan], ids=["inf", "nan"])
@params(cells(where=lambda m: m.mergeable))
def test_safe_merge_refuses_non_finite_and_changes_nothing(method, family, task, poison):
    peft = make(method, family, task)
    before = base_tensors(peft)
    # poison the last adapted module: a layer-by-layer merge would have touched the others first
    last = [n for n, _ in peft.named_parameters() if is_adapter_param(n) and ".modules_to_save." not in n][-1]
    with torch.no_grad():
        peft.get_parameter(last).view(-1)[0] = poison
    module = last[:min(last.index(m) for m in ADAPTER_MARKERS if m in last)].removeprefix("base_model.model.")
    for merge in (peft.merge_adapter, peft.merge_and_unload):
        with pytest.raises(AdapterError, match=re.escape(module)):
            merge(safe_merge=True)
        assert all(torch.equal(v, before[n]) for n, v in base_tensors(peft).items())
    assert list(peft.peft_config) == ["default"]


@covers(5)
@params(cells(where=lambda m: not m.mergeable))
def test_merge_is_refused_clearly_and_changes_nothing(method, family, task):
    peft = make(method, family, task)
    batch = F.make_batch(family, task)
    before = run(peft, batch)
    with pytest.raises(AdapterError, match="not a change of the weights; nothing was merged|prompt-based"):
        peft.merge_and_unload()
    torch.testing.assert_close(run(peft, batch), before, rtol=0, atol=0)


# ---- 6-8: disable, two adapters, mixed batches ----------------------------------------------------------
@covers(6)
@params(cells())
def test_disable_gives_base_output(method, family, task):
    peft = make(method, family, task)
    batch = F.make_batch(family, task)
    base = run(F.make_model(family, task), batch)
    adapted = run(peft, batch)
    assert differs(adapted, base)
    with peft.disable_adapter():
        torch.testing.assert_close(run(peft, batch), base, rtol=0, atol=0)
    torch.testing.assert_close(run(peft, batch), adapted, rtol=0, atol=0)


@covers(7)
@params(cells())
def test_two_adapters_switch_and_delete(method, family, task, tmp_path):
    second = make(method, family, task, seed=1)
    second.save_pretrained(tmp_path)
    batch = F.make_batch(family, task)
    both = make(method, family, task, seed=0)
    expected = {"default": run(both, batch), "second": run(second, batch)}
    assert differs(expected["default"], expected["second"])
    both.load_adapter(tmp_path, adapter_name="second")
    torch.testing.assert_close(run(both, batch), expected["default"], rtol=0, atol=0)  # loading does not activate
    for name in ("second", "default", "second"):
        both.set_adapter(name)
        torch.testing.assert_close(run(both, batch), expected[name], rtol=0, atol=1e-6)
    both.delete_adapter("second")
    assert list(both.peft_config) == ["default"] and both.active_adapters == ["default"]
    torch.testing.assert_close(run(both, batch), expected["default"], rtol=0, atol=1e-6)
    both.delete_adapter("default")  # nothing of the adapters is left: no wrappers, no hooks
    model = both.get_base_model()
    assert not any(type(m).__module__.startswith("unipeft") for m in model.modules())
    assert not any(m._forward_pre_hooks for m in model.modules())
    assert set(model.state_dict()) == set(F.make_model(family, task).state_dict())
    torch.testing.assert_close(run(both, batch), run(F.make_model(family, task), batch), rtol=0, atol=0)


def two_adapters(method, family, task):
    peft = make(method, family, task)
    peft.add_adapter("second", METHODS[method].build(task))
    return randomize(peft, "second", seed=7)


@covers(8)
@params(cells(where=lambda m: m.mixed_batch))
def test_mixed_batch_equals_rows_alone(method, family, task):
    peft = two_adapters(method, family, task)
    batch = F.make_batch(family, task)
    names = ["default", BASE, "second"]
    mixed = run(peft, batch, adapter_names=names)
    alone = [run_as(peft, name, lambda: run(peft, rows(batch, i))) for i, name in enumerate(names)]
    for i in range(len(names)):
        torch.testing.assert_close(mixed[i:i + 1], alone[i], rtol=1e-5, atol=1e-5)
    other = run_as(peft, "second", lambda: run(peft, rows(batch, 0)))  # each row really is its own adapter's
    assert differs(alone[0], other)


@covers(8)
@params(cells(where=lambda m: not m.mixed_batch))
def test_mixed_batch_is_refused_clearly(method, family, task):
    """Virtual tokens change the sequence (or key) length, which rows of one batch cannot differ in."""
    peft = two_adapters(method, family, task)
    with pytest.raises(AdapterError, match="cannot be mixed in one batch"):
        run(peft, F.make_batch(family, task), adapter_names=["default", BASE, "second"])


# ---- 9: generate ---------------------------------------------------------------------------------------
def greedy_and_beam(peft, ids, **kwargs):
    common = dict(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=4, min_new_tokens=4)
    with torch.no_grad():
        return {(beams, cache): peft.generate(**common, num_beams=beams, do_sample=False, use_cache=cache, **kwargs)
                for beams in (1, 2) for cache in (True, False)}


def without_eos(*models):
    for model in models:  # the greedy loop does not stop at EOS, nor may generate()
        model.generation_config.eos_token_id = None
        model.generation_config.forced_eos_token_id = None


@covers(9)
@params(cells(tasks=GENERATIVE_TASKS))
def test_generate_greedy_and_beam_with_and_without_cache(method, family, task):
    peft = make(method, family, task)
    base = F.make_model(family, task)
    without_eos(peft.get_base_model(), base)
    ids = F.make_batch(family, task, batch=2, length=5)["input_ids"]
    encoder_decoder = task == "SEQ_2_SEQ_LM"
    # an instance-dependent prompt (IDPG) comes from the input alone, not from the tokens generated so far
    with peft._pinned_prompts((), {"input_ids": ids, "attention_mask": torch.ones_like(ids)}):
        expected = greedy_by_forward(peft, ids, 4, encoder_decoder)
    out = greedy_and_beam(peft, ids)
    assert torch.equal(out[1, True], expected) and torch.equal(out[1, False], expected)
    assert torch.equal(out[2, True], out[2, False])
    if not encoder_decoder:  # only real tokens: the input, then new tokens
        assert out[2, True].shape == (2, 5 + 4) and torch.equal(out[2, True][:, :5], ids)
    with peft.disable_adapter():
        assert torch.equal(greedy_and_beam(peft, ids)[1, True], greedy_by_forward(base, ids, 4, encoder_decoder))


@covers(9)
@params(cells(tasks=GENERATIVE_TASKS, where=lambda m: m.mergeable))
def test_generate_matches_the_merged_model(method, family, task):
    peft = make(method, family, task)
    merged = copy.deepcopy(peft).merge_and_unload()
    without_eos(peft.get_base_model(), merged)
    ids = F.make_batch(family, task, batch=2, length=5)["input_ids"]
    assert greedy_and_beam(peft, ids).keys() == greedy_and_beam(merged, ids).keys()
    for settings, out in greedy_and_beam(peft, ids).items():
        assert torch.equal(out, greedy_and_beam(merged, ids)[settings]), settings


@covers(9)
@params(cells(tasks=GENERATIVE_TASKS, where=lambda m: m.mixed_batch))
def test_mixed_batch_generate_equals_rows_alone(method, family, task):
    peft = two_adapters(method, family, task)
    without_eos(peft.get_base_model())
    ids = F.make_batch(family, task)["input_ids"]
    names = ["default", "second", BASE]
    for beams in (1, 2):
        mixed = greedy_and_beam(peft, ids, adapter_names=names)[beams, True]
        for i, name in enumerate(names):
            alone = run_as(peft, name, lambda: greedy_and_beam(peft, ids[i:i + 1])[beams, True])
            assert torch.equal(mixed[i:i + 1], alone), f"beams={beams} row {i} ({name})"


# ---- 10, 11: bf16, counts ------------------------------------------------------------------------------
@covers(10)
@params(cells())
def test_bf16_forward_backward_finite(method, family, task):
    peft = get_peft_model(F.make_model(family, task).to(torch.bfloat16), METHODS[method].build(task))
    adapter = {n: p for n, p in peft.named_parameters() if p.requires_grad}
    assert {p.dtype for p in adapter.values()} == {torch.bfloat16}
    out = forward_for_loss(peft, F.make_batch(family, task), task)
    assert F.output_tensor(out).dtype == torch.bfloat16  # no silent upcast of the activations
    loss = loss_of(out, task)
    loss.float().backward()
    assert torch.isfinite(loss)
    for name, param in adapter.items():
        assert param.grad is not None and torch.isfinite(param.grad).all(), name
    assert any(param.grad.abs().sum() > 0 for param in adapter.values())


@covers(11)
@params(cells(where=lambda m: m.count is not None))
def test_trainable_parameter_count_formula(method, family, task):
    model = F.make_model(family, task)
    trainable, kept = METHODS[method].counts(model, task)
    heads = sum(p.numel() for h in head_paths(model, task) for p in model.get_submodule(h).parameters())
    base_total = sum(p.numel() for p in model.parameters())
    assert trainable > 0
    peft = get_peft_model(model, METHODS[method].build(task))
    # the trained head copies stand in for the originals, so the total counts each head once
    assert peft.get_nb_trainable_parameters() == (trainable + heads, base_total + trainable)
    if not heads:  # a network used only in training (P-tuning's, a prefix's MLP) folds away for inference
        assert peft.get_nb_inference_parameters() == (kept, base_total + kept)


# ---- HF PEFT reads our files and we read theirs ---------------------------------------------------------
@params([(m, f, t) for m, row in METHODS.items() if row.twin for f, t in row.twin_cells])
def test_hf_peft_reads_ours_and_we_read_theirs(method, family, task, tmp_path):
    assert_both_ways(family, task, lambda lib: METHODS[method].twin(lib, task), tmp_path)
