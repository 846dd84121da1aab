"""LoRA passes the DESIGN.md section-4 properties on every (family, task) cell of `families.MATRIX`.

Expected values come from outside the code under test: the untouched base model, hand-computed
formulas, HF PEFT's table of default LoRA targets, or a second unipeft path that must agree with the
first (e.g. generate() of the merged model). Each property test is tagged with `@covers(n)` (its
DESIGN.md number); `support_matrix.py` reads those tags to render the README support matrix.
"""
from __future__ import annotations

import copy
import math
import re

import pytest
import torch
import torch.nn as nn
from peft.utils.constants import TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING as PEFT_DEFAULT_TARGETS
from safetensors.torch import load_file
from transformers.pytorch_utils import Conv1D

import families as F
import support_matrix
from unipeft import AdapterError, LoraConfig, PeftModel, get_peft_model

R, ALPHA = 4, 8  # scaling alpha / r = 2, so a wrong scaling shows up
HEAD_TASKS = ("SEQ_CLS", "TOKEN_CLS")  # tasks whose newly initialised head is trained and saved
GENERATIVE_TASKS = ("CAUSAL_LM", "SEQ_2_SEQ_LM")
BASE = "__base__"
ATOL = 1e-5  # fp32: merged vs unmerged weights, and one row vs a whole batch, differ only by rounding


def cells(tasks=None):
    return [pytest.param(f, t, id=f"{f}-{t}") for f, t in F.MATRIX if tasks is None or t in tasks]


ALL_CELLS = cells()
GENERATIVE_CELLS = cells(GENERATIVE_TASKS)


def covers(number: int):
    """Tag a test with the DESIGN.md section-4 property it checks (read by support_matrix.py)."""
    def tag(fn):
        fn.covers = number
        return fn
    return tag


# ---- what the adapter should look like, computed without unipeft ------------------------------------
def target_paths(model: nn.Module, task: str) -> list[str]:
    """Modules LoRA adapts by default: HF PEFT's per-family suffix table, outside the task head."""
    suffixes = PEFT_DEFAULT_TARGETS[model.config.model_type]
    heads = head_paths(model, task)
    return [
        name for name, module in model.named_modules()
        if name.split(".")[-1] in suffixes and isinstance(module, (nn.Linear, Conv1D))
        and not any(name.startswith(h + ".") for h in heads)
    ]


def head_paths(model: nn.Module, task: str) -> list[str]:
    """A classifier's new head: its top-level children with parameters outside the pretrained backbone."""
    if task not in HEAD_TASKS:
        return []
    return [name for name, child in model.named_children()
            if name != model.base_model_prefix and any(True for _ in child.parameters())]


def in_out_features(module: nn.Module) -> tuple[int, int]:
    weight = module.weight
    return tuple(weight.shape) if isinstance(module, Conv1D) else tuple(weight.shape[::-1])  # Conv1D: [in, out]


def is_adapter_key(name: str) -> bool:
    return ".lora_" in name or ".modules_to_save." in name


def adapter_params(peft: PeftModel, adapter: str) -> dict[str, nn.Parameter]:
    return {n: p for n, p in peft.named_parameters() if is_adapter_key(n) and f".{adapter}." in n}


def base_state(peft_or_model: nn.Module) -> dict[str, torch.Tensor]:
    """The base model's tensors under their original names, seen through any adapter wrappers."""
    model = peft_or_model.get_base_model() if isinstance(peft_or_model, PeftModel) else peft_or_model
    return {
        k.replace(".base_layer.", ".").replace(".original_module.", "."): v.detach().clone()
        for k, v in model.state_dict().items() if not is_adapter_key(k)
    }


def assert_state_equal(actual: dict, expected: dict, atol: float | None = None) -> None:
    assert actual.keys() == expected.keys()
    for key, value in expected.items():
        if atol is None:
            assert torch.equal(actual[key], value), f"{key} changed"
        else:
            torch.testing.assert_close(actual[key], value, atol=atol, rtol=0, msg=f"{key} not restored")


# ---- building and running ----------------------------------------------------------------------------
def lora_config(task: str, **overrides) -> LoraConfig:
    return LoraConfig(task_type=task, r=R, lora_alpha=ALPHA, **overrides)


def forward(model: nn.Module, batch: dict, **kwargs) -> torch.Tensor:
    with torch.no_grad():
        return F.output_tensor(model(**batch, **kwargs))


def rows(batch: dict, index: int) -> dict:
    return {k: v[index:index + 1] for k, v in batch.items()}


def base_setup(family: str, task: str, dtype=torch.float32):
    """A fresh base model (seed 0), the tiny batch, and the base output before any wrapping."""
    model = F.make_model(family, task, seed=0).to(dtype)
    batch = F.make_batch(family, task)
    return model, batch, forward(model, batch)


def wrap(model: nn.Module, task: str, adapters=("default",)) -> PeftModel:
    """get_peft_model for the first adapter, add_adapter for the rest, each with random weights.

    B is random (init_lora_weights=False) and each adapter's head copies get their own noise, so
    every adapter (head included) changes the output and differs from the others.
    """
    peft = None
    for i, name in enumerate(adapters):
        torch.manual_seed(100 + i)
        config = lora_config(task, init_lora_weights=False)
        if peft is None:
            peft = get_peft_model(model, config, adapter_name=name)
        else:
            peft.add_adapter(name, config)
        generator = torch.Generator().manual_seed(200 + i)
        with torch.no_grad():
            for pname, param in adapter_params(peft, name).items():
                if ".modules_to_save." in pname:
                    param.add_(0.5 * torch.randn(param.shape, generator=generator, dtype=param.dtype))
    return peft


def loss_of(out, task: str) -> torch.Tensor:
    if task == "FEATURE_EXTRACTION":  # no labels: pull the hidden state towards a fixed random target
        hidden = out.last_hidden_state
        target = torch.randn(hidden.shape, generator=torch.Generator().manual_seed(7)).to(hidden.dtype)
        return nn.functional.mse_loss(hidden, target)
    return out.loss


def train(peft: PeftModel, task: str, batch: dict, steps: int, lr: float = 1e-2) -> list[float]:
    """Plain AdamW steps (no weight decay: a change can only come from a gradient).

    Returns the loss before each step and, last, the loss after the final step."""
    params = [p for p in peft.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    losses = []
    for _ in range(steps):
        loss = loss_of(peft(**batch), task)
        losses.append(loss.item())
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    with torch.no_grad():
        losses.append(loss_of(peft(**batch), task).item())
    return losses


def close(actual: torch.Tensor, expected: torch.Tensor) -> None:
    torch.testing.assert_close(actual, expected, atol=ATOL, rtol=ATOL)


def differs(a: torch.Tensor, b: torch.Tensor) -> bool:
    return not torch.allclose(a, b, atol=1e-3)


# ---- 1: what trains, and what stays frozen ------------------------------------------------------------
def adapter_layout(model: nn.Module, task: str, adapter: str = "default") -> dict[str, str]:
    """Checkpoint key (HF PEFT layout: no adapter name) -> the PeftModel parameter it holds."""
    layout = {}
    for path in target_paths(model, task):
        for ab in "AB":
            layout[f"base_model.model.{path}.lora_{ab}.weight"] = f"base_model.model.{path}.lora_{ab}.{adapter}.weight"
    for head in head_paths(model, task):
        for key in model.get_submodule(head).state_dict():
            layout[f"base_model.model.{head}.{key}"] = f"base_model.model.{head}.modules_to_save.{adapter}.{key}"
    return layout


@covers(1)
@pytest.mark.parametrize("family,task", ALL_CELLS)
def test_only_adapter_trains_and_base_is_bit_identical(family, task):
    model, batch, _ = base_setup(family, task)
    expected = set(adapter_layout(model, task).values())
    before = base_state(model)
    peft = get_peft_model(model, lora_config(task))

    trainable = {n for n, p in peft.named_parameters() if p.requires_grad}
    assert trainable == expected
    initial = {n: p.detach().clone() for n, p in peft.named_parameters() if p.requires_grad}
    train(peft, task, batch, steps=3)

    params = dict(peft.named_parameters())
    unchanged = [n for n, value in initial.items() if torch.equal(params[n], value)]
    assert unchanged == []
    assert_state_equal(base_state(peft), before)


# ---- 2: identity at init ----------------------------------------------------------------------------
@covers(2)
@pytest.mark.parametrize("family,task", ALL_CELLS)
def test_identity_at_init(family, task):
    model, batch, base_out = base_setup(family, task)
    peft = get_peft_model(model, lora_config(task))
    assert any(".lora_B." in n for n, _ in peft.named_parameters())
    assert torch.equal(forward(peft, batch), base_out)


# ---- 3: training reduces the loss -------------------------------------------------------------------
@covers(3)
@pytest.mark.parametrize("family,task", ALL_CELLS)
def test_training_reduces_loss(family, task):
    model, batch, _ = base_setup(family, task)
    peft = get_peft_model(model, lora_config(task))
    losses = train(peft, task, batch, steps=5)
    assert all(math.isfinite(x) for x in losses)
    assert losses[-1] < losses[0]


# ---- 4: save and load -----------------------------------------------------------------------------
@covers(4)
@pytest.mark.parametrize("family,task", ALL_CELLS)
def test_save_load_roundtrip(family, task, tmp_path):
    model, batch, base_out = base_setup(family, task)
    layout = adapter_layout(model, task)
    peft = wrap(model, task)
    adapted = forward(peft, batch)
    assert differs(adapted, base_out)
    peft.save_pretrained(tmp_path)

    # the file holds exactly the adapter's tensors, under PEFT's keys, with the adapter's values
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter_config.json", "adapter_model.safetensors"]
    tensors = load_file(tmp_path / "adapter_model.safetensors")
    assert tensors.keys() == layout.keys()
    params = dict(peft.named_parameters())
    for key, owner in layout.items():
        assert torch.equal(tensors[key], params[owner]), key

    def fresh():
        return F.make_model(family, task, seed=0)

    assert torch.equal(forward(PeftModel.from_pretrained(fresh(), tmp_path), batch), adapted)

    renamed = PeftModel.from_pretrained(fresh(), tmp_path, adapter_name="renamed")
    assert renamed.active_adapter == "renamed" and list(renamed.peft_config) == ["renamed"]
    assert torch.equal(forward(renamed, batch), adapted)

    host = wrap(fresh(), task, adapters=("host",))
    host_out = forward(host, batch)
    host.load_adapter(tmp_path, adapter_name="loaded")
    assert torch.equal(forward(host, batch), host_out)  # loading does not activate
    host.set_adapter("loaded")
    assert torch.equal(forward(host, batch), adapted)
    host.set_adapter("host")
    assert torch.equal(forward(host, batch), host_out)


# ---- 5: merge ---------------------------------------------------------------------------------------
@covers(5)
@pytest.mark.parametrize("family,task", ALL_CELLS)
def test_merge_unmerge_and_unload_agree(family, task):
    model, batch, base_out = base_setup(family, task)
    targets = target_paths(model, task)
    base_weights = base_state(model)
    peft = wrap(model, task)
    unmerged = forward(peft, batch)
    assert differs(unmerged, base_out)

    peft.merge_adapter()
    merged_weights = base_state(peft)
    for path in targets:  # W + (alpha / r) B A, computed here from the adapter's factors
        module = peft.get_base_model().get_submodule(path)
        delta = ALPHA / R * module.lora_B["default"].weight @ module.lora_A["default"].weight
        expected = base_weights[f"{path}.weight"] + (delta.T if isinstance(module.base_layer, Conv1D) else delta)
        assert differs(expected, base_weights[f"{path}.weight"])
        torch.testing.assert_close(merged_weights[f"{path}.weight"], expected, atol=1e-6, rtol=1e-6)
    close(forward(peft, batch), unmerged)

    peft.unmerge_adapter()
    assert_state_equal(base_state(peft), base_weights, atol=1e-6)
    close(forward(peft, batch), unmerged)

    unloaded = copy.deepcopy(peft).merge_and_unload()
    assert not any(is_adapter_key(k) or ".base_layer." in k for k in unloaded.state_dict())
    close(forward(unloaded, batch), unmerged)


@covers(5)
@pytest.mark.parametrize("poison", [math.inf, math.nan], ids=["inf", "nan"])
@pytest.mark.parametrize("family,task", ALL_CELLS)
def test_safe_merge_refuses_non_finite(family, task, poison):
    model, _, _ = base_setup(family, task)
    last = target_paths(model, task)[-1]  # poison the last layer: a layer-by-layer merge would touch the others first
    base_weights = base_state(model)
    peft = wrap(model, task)
    with torch.no_grad():
        peft.get_base_model().get_submodule(last).lora_B["default"].weight[0, 0] = poison

    with pytest.raises(AdapterError, match=re.escape(last)):
        peft.merge_adapter(safe_merge=True)
    assert_state_equal(base_state(peft), base_weights)
    with pytest.raises(AdapterError, match=re.escape(last)):
        peft.merge_and_unload(safe_merge=True)
    assert_state_equal(base_state(peft), base_weights)
    assert list(peft.peft_config) == ["default"]


# ---- 6: disable_adapter -----------------------------------------------------------------------------
@covers(6)
@pytest.mark.parametrize("family,task", ALL_CELLS)
def test_disable_adapter_gives_base(family, task):
    model, batch, base_out = base_setup(family, task)
    peft = wrap(model, task)
    adapted = forward(peft, batch)
    assert differs(adapted, base_out)
    with peft.disable_adapter():
        assert torch.equal(forward(peft, batch), base_out)
    assert torch.equal(forward(peft, batch), adapted)


# ---- 7: two adapters --------------------------------------------------------------------------------
def single_adapter_twin(family: str, task: str, source: PeftModel, name: str) -> PeftModel:
    """A model with only adapter `name`, holding the same weights as that adapter in `source`."""
    twin = wrap(F.make_model(family, task, seed=0), task, adapters=(name,))
    wanted = adapter_params(source, name)
    mine = adapter_params(twin, name)
    assert mine.keys() == wanted.keys()
    with torch.no_grad():
        for pname, param in mine.items():
            param.copy_(wanted[pname])
    return twin


@covers(7)
@pytest.mark.parametrize("family,task", ALL_CELLS)
def test_two_adapters_switch_and_delete(family, task):
    model, batch, base_out = base_setup(family, task)
    base_keys = set(model.state_dict())
    peft = wrap(model, task, adapters=("first", "second"))
    alone = {name: forward(single_adapter_twin(family, task, peft, name), batch) for name in ("first", "second")}

    assert peft.active_adapter == "first"
    out_first = forward(peft, batch)
    assert torch.equal(out_first, alone["first"])
    peft.set_adapter("second")
    out_second = forward(peft, batch)
    assert torch.equal(out_second, alone["second"])
    assert differs(out_first, out_second)

    peft.delete_adapter("first")
    assert list(peft.peft_config) == ["second"] and peft.active_adapters == ["second"]
    assert not [n for n, _ in peft.named_modules() if ".first." in n + "."]
    assert torch.equal(forward(peft, batch), alone["second"])

    peft.delete_adapter("second")  # the last one: the model is the base model again
    assert peft.peft_config == {}
    assert set(peft.get_base_model().state_dict()) == base_keys
    assert torch.equal(forward(peft, batch), base_out)


# ---- 8: mixed batch ---------------------------------------------------------------------------------
def run_as(peft: PeftModel, name: str, fn):
    """fn() with adapter `name` alone active, or with adapters disabled for "__base__"."""
    if name == BASE:
        with peft.disable_adapter():
            return fn()
    peft.set_adapter(name)
    return fn()


@covers(8)
@pytest.mark.parametrize("family,task", ALL_CELLS)
def test_mixed_batch_equals_rows_alone(family, task):
    model, batch, base_out = base_setup(family, task)
    peft = wrap(model, task, adapters=("first", "second"))
    names = ["first", "second", BASE]
    mixed = forward(peft, batch, adapter_names=names)

    for i, name in enumerate(names):
        alone = run_as(peft, name, lambda: forward(peft, rows(batch, i)))
        close(mixed[i:i + 1], alone)
    close(mixed[2], base_out[2])
    for i in range(2):  # the adapter rows really are adapted, and each by its own adapter and head
        assert differs(mixed[i], base_out[i])
        other = run_as(peft, names[1 - i], lambda: forward(peft, rows(batch, i)))
        assert differs(mixed[i:i + 1], other)


# ---- 9: generate ------------------------------------------------------------------------------------
def generate(model: nn.Module, batch: dict, scores: bool = False, **kwargs):
    """Token ids (or, with scores=True, the per-step scores too) for the batch's prompts."""
    inputs = {k: batch[k] for k in ("input_ids", "attention_mask")}
    with torch.no_grad():  # a fixed length (no early EOS), so rows generated alone line up with a batch
        out = model.generate(**inputs, max_new_tokens=4, min_new_tokens=4, do_sample=False,
                             return_dict_in_generate=True, output_scores=True, **kwargs)
    return (out.sequences, torch.stack(out.scores)) if scores else out.sequences


def assert_real_tokens(out: torch.Tensor, batch: dict, task: str) -> None:
    assert out.dtype == torch.long and ((out >= 0) & (out < F.VOCAB)).all()
    if task == "CAUSAL_LM":  # the prompt comes back unchanged, followed by the new tokens
        assert torch.equal(out[:, :batch["input_ids"].shape[1]], batch["input_ids"])


@covers(9)
@pytest.mark.parametrize("family,task", GENERATIVE_CELLS)
def test_generate_matches_merged_model(family, task):
    model, batch, _ = base_setup(family, task)
    peft = wrap(model, task)
    merged = copy.deepcopy(peft).merge_and_unload()
    for num_beams in (1, 2):
        for use_cache in (True, False):
            settings = f"num_beams={num_beams} use_cache={use_cache}"
            out = generate(peft, batch, num_beams=num_beams, use_cache=use_cache)
            assert_real_tokens(out, batch, task)
            assert torch.equal(out, generate(merged, batch, num_beams=num_beams, use_cache=use_cache)), settings

    # the adapter really steers generation (tiny random models may still pick the same tokens)
    _, adapted_scores = generate(peft, batch, scores=True)
    _, merged_scores = generate(merged, batch, scores=True)
    close(adapted_scores, merged_scores)
    with peft.disable_adapter():
        _, base_scores = generate(peft, batch, scores=True)
    assert differs(adapted_scores, base_scores)


@covers(9)
@pytest.mark.parametrize("num_beams", [1, 2], ids=["greedy", "beam2"])
@pytest.mark.parametrize("family,task", GENERATIVE_CELLS)
def test_mixed_batch_generate_equals_rows_alone(family, task, num_beams):
    model, batch, _ = base_setup(family, task)
    peft = wrap(model, task, adapters=("first", "second"))
    names = ["first", "second", BASE]
    mixed = generate(peft, batch, num_beams=num_beams, adapter_names=names)
    assert_real_tokens(mixed, batch, task)
    for i, name in enumerate(names):
        alone = run_as(peft, name, lambda: generate(peft, rows(batch, i), num_beams=num_beams))
        assert torch.equal(mixed[i:i + 1], alone), f"row {i} ({name})"


# ---- 10: bf16 ---------------------------------------------------------------------------------------
@covers(10)
@pytest.mark.parametrize("autocast", [False, True], ids=["follow-base", "autocast-fp32"])
@pytest.mark.parametrize("family,task", ALL_CELLS)
def test_bf16_forward_backward(family, task, autocast):
    """LoRA factors follow the base dtype, or are fp32 when asked (autocast_adapter_dtype=True, as in
    HF PEFT); task-head copies always keep the base dtype, since they run on the base's activations."""
    model, batch, base_out = base_setup(family, task, dtype=torch.bfloat16)
    peft = get_peft_model(model, lora_config(task), autocast_adapter_dtype=autocast)
    params = adapter_params(peft, "default")
    factor_dtype = torch.float32 if autocast else torch.bfloat16
    assert params and all(p.dtype == (factor_dtype if ".lora_" in n else torch.bfloat16) for n, p in params.items())

    out = peft(**batch)
    assert F.output_tensor(out).dtype == base_out.dtype  # no silent upcast of the activations
    assert torch.isfinite(F.output_tensor(out)).all()
    loss = loss_of(out, task)
    assert torch.isfinite(loss)
    loss.backward()
    for name, param in params.items():
        assert param.grad is not None and param.grad.dtype == param.dtype, name
        assert torch.isfinite(param.grad).all(), name
    assert any(param.grad.abs().sum() > 0 for param in params.values())


# ---- 11: parameter count ----------------------------------------------------------------------------
@covers(11)
@pytest.mark.parametrize("family,task", ALL_CELLS)
def test_trainable_parameter_count_formula(family, task):
    model = F.make_model(family, task, seed=0)
    lora = sum(R * sum(in_out_features(model.get_submodule(p))) for p in target_paths(model, task))
    heads = sum(p.numel() for h in head_paths(model, task) for p in model.get_submodule(h).parameters())
    base_total = sum(p.numel() for p in model.parameters())
    assert lora > 0 and (heads > 0) == (task in HEAD_TASKS)

    peft = get_peft_model(model, lora_config(task))
    # the trained head copies stand in for the originals, so the total counts each head once
    assert peft.get_nb_trainable_parameters() == (lora + heads, base_total + lora)


# ---- README support matrix --------------------------------------------------------------------------
def test_readme_support_matrix_is_current():
    assert support_matrix.readme_block() == support_matrix.render(), \
        "README support matrix is stale: run `python tests/support_matrix.py --write`"
