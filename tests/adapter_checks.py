"""What the method tests share: running a model, a loss for every task, a few training steps, moving an
adapter away from its init, and the checks several suites make (merge round trip, greedy decoding by hand).
No tests here; test modules import from this one, never from each other.
"""
from __future__ import annotations

import torch
import torch.nn as nn

import families as F
from unipeft.registry import get_method, known_peft_types

BASE = "__base__"  # the adapter name that selects no adapter for a row of a mixed batch
NO_CACHE = {"deberta", "deberta-v2"}  # their attention takes no key/value cache: no prefix can attach
NO_BIAS = {"t5", "llama", "mistral"}  # no biases: BitFit has nothing to train there


def covers(number: int):
    """Tag a test with the DESIGN.md section-4 property it checks (read by support_matrix.py)."""
    def tag(fn):
        fn.covers = number
        return fn
    return tag


# Every method names its parameters "<prefix>..." (MethodSpec.prefix); trained head copies sit under modules_to_save.
ADAPTER_MARKERS = tuple(sorted({f".{get_method(t).prefix}" for t in known_peft_types() if get_method(t).prefix})) \
    + (".modules_to_save.",)


def is_adapter_param(name: str) -> bool:
    return any(marker in name for marker in ADAPTER_MARKERS)


def run(model, batch, **kwargs) -> torch.Tensor:
    """The main output; seq2seq models keep their labels, from which they build the decoder inputs."""
    keep_labels = model.config.is_encoder_decoder and "decoder_input_ids" not in batch
    with torch.no_grad():
        return F.output_tensor(model(**{k: v for k, v in batch.items() if k != "labels" or keep_labels}, **kwargs))


def rows(batch: dict, index: int) -> dict:
    return {k: v[index:index + 1] for k, v in batch.items()}


def run_as(peft, name: str, fn):
    """fn() with adapter `name` alone active, or with adapters disabled for "__base__"."""
    if name == BASE:
        with peft.disable_adapter():
            return fn()
    peft.set_adapter(name)
    return fn()


def loss_of(out, task: str) -> torch.Tensor:
    if task == "FEATURE_EXTRACTION":  # no labels: pull the hidden state towards a fixed random target
        hidden = out.last_hidden_state
        target = torch.randn(hidden.shape, generator=torch.Generator().manual_seed(7)).to(hidden.dtype)
        return nn.functional.mse_loss(hidden, target)
    return out.loss


def forward_for_loss(model, batch: dict, task: str):
    return model(**({k: v for k, v in batch.items() if k != "labels"} if task == "FEATURE_EXTRACTION" else batch))


def train(peft, task: str, batch: dict, steps: int, lr: float = 1e-2) -> list[float]:
    """Plain AdamW steps (no weight decay: a change can only come from a gradient).

    Returns the loss before each step and, last, the loss after the final step."""
    params = [p for p in peft.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    losses = []
    for _ in range(steps):
        loss = loss_of(forward_for_loss(peft, batch, task), task)
        losses.append(loss.item())
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    with torch.no_grad():
        losses.append(loss_of(forward_for_loss(peft, batch, task), task).item())
    return losses


def randomize(peft, name="default", seed=100):
    """Move every adapter tensor away from its init (and each head copy too), so each check sees a real change."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for pname, p in peft.named_parameters():
            if is_adapter_param(pname) and (f".{name}." in pname or pname.endswith(f".{name}")):
                p.add_(0.2 * torch.randn(p.shape, generator=g, dtype=p.dtype))
    return peft


def base_tensors(peft) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in peft.get_base_model().named_parameters() if not is_adapter_param(n)}


def assert_merge_round_trip(peft_model, batch: dict) -> None:
    """Merged = unmerged outputs (fp32 1e-5), unmerge restores every base tensor, merge_and_unload agrees."""
    before = base_tensors(peft_model)
    expected = run(peft_model, batch)
    peft_model.merge_adapter()
    torch.testing.assert_close(run(peft_model, batch), expected, rtol=1e-5, atol=1e-5)
    peft_model.unmerge_adapter()
    after = dict(peft_model.get_base_model().named_parameters())
    for name, value in before.items():
        torch.testing.assert_close(after[name], value, rtol=0, atol=1e-6)
    torch.testing.assert_close(run(peft_model.merge_and_unload(), batch), expected, rtol=1e-5, atol=1e-5)


def assert_state_equal(actual: dict, expected: dict, atol: float | None = None) -> None:
    assert actual.keys() == expected.keys()
    for key, value in expected.items():
        if atol is None:
            assert torch.equal(actual[key], value), f"{key} changed"
        else:
            torch.testing.assert_close(actual[key], value, atol=atol, rtol=0, msg=f"{key} not restored")


def greedy_by_forward(peft, ids, steps, encoder_decoder):
    """Greedy decoding by full forward passes: no cache, no generate()."""
    if encoder_decoder:
        start = peft.config.decoder_start_token_id
        out = torch.full((ids.shape[0], 1), start)
        for _ in range(steps):
            logits = run(peft, {"input_ids": ids, "attention_mask": torch.ones_like(ids), "decoder_input_ids": out})
            out = torch.cat([out, logits[:, -1].argmax(-1, keepdim=True)], dim=1)
        return out
    out = ids
    for _ in range(steps):
        logits = run(peft, {"input_ids": out, "attention_mask": torch.ones_like(out)})
        out = torch.cat([out, logits[:, -1].argmax(-1, keepdim=True)], dim=1)
    return out
