"""The interop check every PEFT-shared method runs: an adapter moves both ways between unipeft and HF PEFT
with the same outputs and the same checkpoint keys."""
from __future__ import annotations

import inspect
import warnings

import peft
import torch
from safetensors.torch import load_file

import families as F
import unipeft
from adapter_checks import randomize, run


def peft_base(model: torch.nn.Module) -> torch.nn.Module:
    """The oracle's base model. HF PEFT 0.21.2 decides that prefix tuning can run by finding `past_key_values` in
    the backbone's signature; transformers 5.25 renamed it `cache` (still accepting the old name), so PEFT refuses
    every SEQ_CLS prefix there. Listing the old name in the signature again lets the oracle run unchanged: the
    call it then makes with `past_key_values=` reaches the model through transformers' own renaming."""
    for module in model.modules():
        signature = inspect.signature(module.forward)
        if "cache" not in signature.parameters or "past_key_values" in signature.parameters:
            continue
        old = inspect.Parameter("past_key_values", inspect.Parameter.KEYWORD_ONLY, default=None)
        params = list(signature.parameters.values())
        at = len(params) - (params[-1].kind is inspect.Parameter.VAR_KEYWORD)
        forward = module.forward

        def exposed(*args, _forward=forward, **kwargs):
            return _forward(*args, **kwargs)

        exposed.__signature__ = signature.replace(parameters=params[:at] + [old] + params[at:])
        module.forward = exposed
    return model


def assert_both_ways(family: str, task: str, make_config, tmp_path, batch: dict | None = None):
    """`make_config(lib)` builds the same config from `unipeft` or `peft`. Each side starts off its init
    (randomized), so a wrong formula or key cannot pass; PEFT must load our files without a warning.
    Returns (our model, our model loaded from PEFT's files)."""
    batch = batch or F.make_batch(family, task)
    ours = randomize(unipeft.get_peft_model(F.make_model(family, task), make_config(unipeft)))
    assert not torch.allclose(run(ours, batch), run(F.make_model(family, task), batch), atol=1e-4)
    ours.save_pretrained(tmp_path / "ours")
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        # PEFT says this of every non-linear module it wraps (LN tuning's norms), its own files' too
        warnings.filterwarnings("ignore", "Unsupported layer type", UserWarning)
        theirs = peft.PeftModel.from_pretrained(F.make_model(family, task), tmp_path / "ours").eval()
    torch.testing.assert_close(run(theirs, batch), run(ours, batch), rtol=1e-5, atol=1e-5)
    torch.manual_seed(1)
    theirs = randomize(peft.get_peft_model(F.make_model(family, task), make_config(peft)), seed=7).eval()
    theirs.save_pretrained(tmp_path / "theirs")
    loaded = unipeft.PeftModel.from_pretrained(F.make_model(family, task), tmp_path / "theirs")
    torch.testing.assert_close(run(loaded, batch), run(theirs, batch), rtol=1e-5, atol=1e-5)
    keys = [set(load_file(tmp_path / side / "adapter_model.safetensors")) for side in ("ours", "theirs")]
    assert keys[0] == keys[1]
    return ours, loaded
