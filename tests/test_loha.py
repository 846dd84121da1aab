"""LoHa: GPT-2's Conv1D against the formula, counts, bad input.
The section-4 properties on every cell, and HF PEFT interop both ways, run in tests/test_properties.py."""
from __future__ import annotations

import pytest
import torch
import transformers as T

import families as F
from adapter_checks import randomize, run
from unipeft import ConfigError, LoHaConfig, get_peft_model



def config(task):
    return LoHaConfig(task_type=task, r=4, alpha=8, init_weights=False)


def test_gpt2_conv1d_equals_the_base_with_the_formed_weight():
    peft_model = randomize(get_peft_model(F.make_model("gpt2", "CAUSAL_LM"), config("CAUSAL_LM")))
    edited = F.make_model("gpt2", "CAUSAL_LM")
    with torch.no_grad():
        for name, module in peft_model.get_base_model().named_modules():
            if hasattr(module, "hada_w1_a"):
                w1 = module.hada_w1_a["default"] @ module.hada_w1_b["default"]
                w2 = module.hada_w2_a["default"] @ module.hada_w2_b["default"]
                edited.get_submodule(name).weight.add_((w1 * w2 * 2.0).t())  # alpha / r = 2; Conv1D is [in, out]
    batch = F.make_batch("gpt2", "CAUSAL_LM")
    torch.testing.assert_close(run(peft_model, batch), run(edited, batch), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name,make", [("bert-base", T.BertConfig), ("gpt2", T.GPT2Config)])
def test_count_is_two_rank_r_pairs_per_layer(name, make):
    c = make()
    d, layers = c.hidden_size, c.num_hidden_layers
    with torch.device("meta"):
        model = T.AutoModel.from_config(c)
        base = sum(p.numel() for p in model.parameters())
        counted = get_peft_model(model, LoHaConfig(r=8)).get_nb_trainable_parameters()
    per_layer = 2 * 2 * 8 * (d + d) if name == "bert-base" else 2 * 8 * (d + 3 * d)  # q, v / c_attn (d -> 3d)
    assert counted == (layers * per_layer, base + layers * per_layer)


@pytest.mark.parametrize("kwargs,message", [(dict(r=0), "r must be a positive"),
                                            (dict(rank_dropout=1.5), r"rank_dropout must be in \[0, 1\]")])
def test_bad_config(kwargs, message):
    with pytest.raises(ConfigError, match=message):
        LoHaConfig(**kwargs)
