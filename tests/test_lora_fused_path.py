"""The fused single-adapter LoRA path (one autograd node for base + LoRA) against the plain formula.

Expected values are computed outside the code under test: x W^T + b + (alpha / r) (x A^T) B^T with
plain torch ops, and its gradients by autograd. The fused path must also step aside (general path)
whenever it could change behaviour: dropout in training, hooks or a patched forward on the base layer,
a trainable base weight, autocast.
"""
from __future__ import annotations

import types

import pytest
import torch
import torch.nn as nn
from transformers.pytorch_utils import Conv1D

from unipeft import LoraConfig, get_peft_model

R, ALPHA, D_IN, D_OUT = 3, 7, 24, 40  # scaling 7/3: not a power of two, so rounding differences show


def _layer(kind: str, bias: bool = True, **config):
    torch.manual_seed(0)
    holder = nn.Module()
    holder.proj = nn.Linear(D_IN, D_OUT, bias=bias) if kind == "linear" else Conv1D(D_OUT, D_IN)
    if kind == "conv1d":
        nn.init.normal_(holder.proj.weight, std=0.2)
        nn.init.normal_(holder.proj.bias, std=0.2)
    model = get_peft_model(holder, LoraConfig(r=R, lora_alpha=ALPHA, target_modules=["proj"], **config))
    layer = model.base_model.model.proj
    with torch.no_grad():
        layer.lora_B["default"].weight.normal_()  # B = 0 at init would hide the LoRA term
    return model, layer


def _formula(layer, kind: str, x: torch.Tensor) -> torch.Tensor:
    base = layer.base_layer
    weight = base.weight.t() if kind == "conv1d" else base.weight  # [out, in]
    A, B = layer.lora_A["default"].weight, layer.lora_B["default"].weight
    out = x @ weight.t() + (ALPHA / R) * ((x @ A.t()) @ B.t())
    return out if base.bias is None else out + base.bias


def _fused(out: torch.Tensor) -> bool:
    return "LoraLinearFunction" in type(out.grad_fn).__name__


@pytest.mark.parametrize("kind,bias", [("linear", True), ("linear", False), ("conv1d", True)])
@pytest.mark.parametrize("shape", [(D_IN,), (5, D_IN), (2, 6, D_IN)])
@pytest.mark.parametrize("x_grad", [True, False])
def test_fused_matches_formula(kind, bias, shape, x_grad):
    _, layer = _layer(kind, bias)
    x = torch.randn(*shape, requires_grad=x_grad)
    out = layer(x)
    assert _fused(out)
    ref = _formula(layer, kind, x)
    assert out.shape == ref.shape
    torch.testing.assert_close(out, ref, rtol=0, atol=1e-5)
    g = torch.randn_like(out)
    wrt = [t for t in (x, layer.lora_A["default"].weight, layer.lora_B["default"].weight) if t.requires_grad]
    for got, want in zip(torch.autograd.grad(out, wrt, g), torch.autograd.grad(ref, wrt, g)):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_frozen_adapter_still_gives_input_gradient():
    _, layer = _layer("linear")
    layer.requires_grad_(False)
    x = torch.randn(4, D_IN, requires_grad=True)
    out = layer(x)
    (got,) = torch.autograd.grad(out.sum(), x)
    (want,) = torch.autograd.grad(_formula(layer, "linear", x).sum(), x)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_training_matches_general_path():
    """A few AdamW steps through the fused path land where the general path lands."""
    finals = []
    for fused in (True, False):
        _, layer = _layer("linear")
        if not fused:
            layer.fused_forward = lambda name, x: None
        params = [p for p in layer.parameters() if p.requires_grad]
        opt = torch.optim.AdamW(params, lr=1e-2)
        torch.manual_seed(1)
        for _ in range(5):
            x = torch.randn(8, D_IN)
            loss = layer(x).pow(2).mean()
            loss.backward()
            opt.step()
            opt.zero_grad()
        finals.append([p.detach().clone() for p in params])
    for a, b in zip(*finals):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_general_path_when_dropout_trains():
    _, layer = _layer("linear", lora_dropout=0.5)
    x = torch.randn(4, D_IN, requires_grad=True)
    assert not _fused(layer.train()(x))
    assert _fused(layer.eval()(x))  # dropout is off in eval: fused again


def test_general_path_honours_base_hooks_and_patched_forward():
    _, layer = _layer("linear")
    x = torch.randn(4, D_IN, requires_grad=True)
    lora_term = _formula(layer, "linear", x) - layer.base_layer(x)
    handle = layer.base_layer.register_forward_hook(lambda mod, inp, out: out * 0)
    torch.testing.assert_close(layer(x), lora_term, rtol=1e-5, atol=1e-5)
    handle.remove()
    layer.base_layer.forward = types.MethodType(lambda self, inp: nn.Linear.forward(self, inp) * 0, layer.base_layer)
    out = layer(x)
    assert not _fused(out)
    del layer.base_layer.forward
    assert _fused(layer(x))


def test_general_path_when_base_trains_or_autocast():
    _, layer = _layer("linear")
    x = torch.randn(4, D_IN, requires_grad=True)
    layer.base_layer.bias.requires_grad_(True)
    out = layer(x)
    assert not _fused(out)
    (grad_bias,) = torch.autograd.grad(out.sum(), layer.base_layer.bias)
    torch.testing.assert_close(grad_bias, torch.full((D_OUT,), 4.0))
    layer.base_layer.bias.requires_grad_(False)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = layer(x)
    assert out.dtype == torch.bfloat16 and not _fused(out)


def test_disabled_and_merged_take_the_general_path():
    model, layer = _layer("linear")
    x = torch.randn(4, D_IN)
    with model.disable_adapter():
        torch.testing.assert_close(layer(x), layer.base_layer(x))
    fused_out = layer(x)
    assert _fused(fused_out)
    model.merge_adapter()
    assert not _fused(layer(x))
    torch.testing.assert_close(layer(x), fused_out, rtol=1e-5, atol=1e-5)
    model.unmerge_adapter()
