"""The release-compatibility subset: every method on representative families, end to end (one training step,
save, load, generate, merge). `scripts/compat.sh` runs it, with tests/test_compat.py and the prefix oracle of
tests/test_seq2seq_prefix.py, against the newest transformers/accelerate/peft releases and against the oldest
supported transformers; the full suite runs on the lock.

Each check has an independent reference: the untouched base weights, the model reloaded from its files, greedy
decoding written out as a loop of full forwards without a cache, and the unmerged model's outputs.
"""
from __future__ import annotations

import pytest
import torch

import families as F
import unipeft as U
from test_block_adapters import is_adapter_param, randomize, run

R = 4
METHODS = {
    "lora": lambda task: U.LoraConfig(task_type=task, r=R, lora_alpha=2 * R),
    "rslora": lambda task: U.LoraConfig(task_type=task, r=R, lora_alpha=2 * R, use_rslora=True),
    "dora": lambda task: U.LoraConfig(task_type=task, r=R, lora_alpha=2 * R, use_dora=True),
    "loha": lambda task: U.LoHaConfig(task_type=task, r=R, alpha=2 * R),
    "lokr": lambda task: U.LoKrConfig(task_type=task, r=R, alpha=2 * R),
    "oft": lambda task: U.OFTConfig(task_type=task, r=0, oft_block_size=4),
    "adalora": lambda task: U.AdaLoraConfig(task_type=task, init_r=R, target_r=R // 2, total_step=10),
    "ia3": lambda task: U.IA3Config(task_type=task),
    "bitfit": lambda task: U.BitFitConfig(task_type=task),
    "prompt": lambda task: U.PromptTuningConfig(task_type=task, num_virtual_tokens=3),
    "ptuning": lambda task: U.PromptEncoderConfig(task_type=task, num_virtual_tokens=3, encoder_hidden_size=16),
    "prefix": lambda task: U.PrefixTuningConfig(task_type=task, num_virtual_tokens=3),
    "prefix-mlp": lambda task: U.PrefixTuningConfig(task_type=task, num_virtual_tokens=3, prefix_projection=True,
                                                    encoder_hidden_size=16),
    "idpg": lambda task: U.IDPGConfig(task_type=task, num_virtual_tokens=3, generator_hidden_size=16,
                                      generator_dropout=0.0),
    "houlsby": lambda task: U.HoulsbyConfig(task_type=task, bottleneck_size=R),
    "pfeiffer": lambda task: U.PfeifferConfig(task_type=task, bottleneck_size=R),
    "parallel": lambda task: U.ParallelAdapterConfig(task_type=task, bottleneck_size=R),
    "scaled_parallel": lambda task: U.ScaledParallelAdapterConfig(task_type=task, bottleneck_size=R),
    "mam": lambda task: U.MAMConfig(task_type=task, attn_bn=3, ffn_bn=R, mid_dim=8),
    "unified-prefix-gate": lambda task: U.UnifiedConfig(task_type=task, attn_mode="prefix", attn_option="concat",
                                                        attn_composition="gate_add", attn_bn=3, mid_dim=8,
                                                        ffn_mode="lora", ffn_bn=R),
    "unified-cross-attn": lambda task: U.UnifiedConfig(task_type=task, attn_mode="prefix", attn_option="cross_attn",
                                                       attn_bn=3, mid_dim=8, ffn_mode="adapter",
                                                       ffn_option="parallel", ffn_bn=R),
}
MERGEABLE = {"lora", "rslora", "dora", "loha", "lokr", "oft", "adalora", "ia3", "bitfit"}
CELLS = [("bert", "SEQ_CLS"), ("gpt2", "CAUSAL_LM"), ("llama", "CAUSAL_LM"), ("t5", "SEQ_2_SEQ_LM"),
         ("bart", "SEQ_2_SEQ_LM")]
NO_BIAS = {"llama", "t5"}  # BitFit has nothing to train there


def cases():
    return [pytest.param(m, f, t, id=f"{m}-{f}") for m in METHODS for f, t in CELLS
            if not (m == "bitfit" and f in NO_BIAS)]


def greedy_by_hand(model, ids: torch.Tensor, steps: int) -> torch.Tensor:
    """Greedy decoding as full forwards without a cache: the new tokens, [batch, steps]."""
    seq2seq = model.config.is_encoder_decoder
    out = torch.full((ids.shape[0], 1), model.config.decoder_start_token_id) if seq2seq else ids
    with torch.no_grad():
        for _ in range(steps):
            inputs = {"input_ids": ids, "decoder_input_ids": out} if seq2seq else {"input_ids": out}
            logits = model(**inputs, use_cache=False).logits
            out = torch.cat([out, logits[:, -1].argmax(-1, keepdim=True)], dim=1)
    return out[:, -steps:]


@pytest.mark.parametrize("method,family,task", cases())
def test_train_save_load_generate_merge(method, family, task, tmp_path):
    torch.manual_seed(0)
    peft = randomize(U.get_peft_model(F.make_model(family, task), METHODS[method](task)))
    base = {n: p.detach().clone() for n, p in peft.named_parameters() if not p.requires_grad}
    trainable = {n: p.detach().clone() for n, p in peft.named_parameters() if p.requires_grad}
    assert trainable and all(is_adapter_param(n) for n in trainable)

    # one training step: the loss is finite, only adapter tensors move
    batch = F.make_batch(family, task)
    peft.train()
    loss = peft(**batch).loss
    assert torch.isfinite(loss)
    loss.backward()
    torch.optim.SGD([p for p in peft.parameters() if p.requires_grad], lr=0.1).step()
    peft.eval()
    moved = [n for n, p in peft.named_parameters() if p.requires_grad and not torch.equal(p, trainable[n])]
    assert moved
    assert all(torch.equal(p, base[n]) for n, p in peft.named_parameters() if not p.requires_grad)

    # save and load onto a fresh base: the same outputs
    expected = run(peft, batch)
    peft.save_pretrained(tmp_path)
    loaded = U.PeftModel.from_pretrained(F.make_model(family, task), tmp_path).eval()
    torch.testing.assert_close(run(loaded, batch), expected, rtol=1e-5, atol=1e-5)

    # generate: greedy with the cache = greedy written out without one
    if task != "SEQ_CLS":
        ids = batch["input_ids"][:2]
        settings = dict(max_new_tokens=3, do_sample=False, pad_token_id=0, eos_token_id=None)
        generated = loaded.generate(input_ids=ids, attention_mask=torch.ones_like(ids), **settings)
        assert torch.equal(generated[:, -3:], greedy_by_hand(loaded, ids, 3))

    # merge: the merged plain model gives the adapter's outputs; the others refuse before changing anything
    if method in MERGEABLE:
        merged = loaded.merge_and_unload()
        assert not isinstance(merged, U.PeftModel)
        torch.testing.assert_close(run(merged, batch), expected, rtol=1e-4, atol=1e-4)
    else:
        with pytest.raises((U.AdapterError, U.ConfigError), match="cannot (be )?merge"):
            loaded.merge_and_unload()
        torch.testing.assert_close(run(loaded, batch), expected, rtol=1e-5, atol=1e-5)
