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
from adapter_checks import greedy_by_forward, is_adapter_param, randomize, run
from capabilities import METHODS as CAPABILITIES
from capabilities import Method, R

# the capability table's rows, and variants the release checks add (another code path each)
METHODS = {**CAPABILITIES, **{
    "rslora": Method(lambda task: U.LoraConfig(task_type=task, r=R, lora_alpha=2 * R, use_rslora=True), mergeable=True),
    "prefix-flat": Method(lambda task: U.PrefixTuningConfig(task_type=task, num_virtual_tokens=3)),
    "unified-prefix-gate": Method(lambda task: U.UnifiedConfig(
        task_type=task, attn_mode="prefix", attn_option="concat", attn_composition="gate_add", attn_bn=3, mid_dim=8,
        ffn_mode="lora", ffn_bn=R)),
    "unified-cross-parallel": Method(lambda task: U.UnifiedConfig(
        task_type=task, attn_mode="prefix", attn_option="cross_attn", attn_bn=3, mid_dim=8, ffn_mode="adapter",
        ffn_option="parallel", ffn_bn=R)),
}}
CELLS = [("bert", "SEQ_CLS"), ("gpt2", "CAUSAL_LM"), ("llama", "CAUSAL_LM"), ("t5", "SEQ_2_SEQ_LM"),
         ("bart", "SEQ_2_SEQ_LM")]


def cases():
    return [pytest.param(m, f, t, id=f"{m}-{f}") for m, row in METHODS.items() for f, t in CELLS
            if f not in row.skip_families]


@pytest.mark.parametrize("method,family,task", cases())
def test_train_save_load_generate_merge(method, family, task, tmp_path):
    torch.manual_seed(0)
    peft = randomize(U.get_peft_model(F.make_model(family, task), METHODS[method].build(task)))
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
        with loaded._pinned_prompts((), {"input_ids": ids, "attention_mask": torch.ones_like(ids)}):
            by_hand = greedy_by_forward(loaded, ids, 3, task == "SEQ_2_SEQ_LM")
        assert torch.equal(generated[:, -3:], by_hand[:, -3:])

    # merge: the merged plain model gives the adapter's outputs; the others refuse before changing anything
    if METHODS[method].mergeable:
        merged = loaded.merge_and_unload()
        assert not isinstance(merged, U.PeftModel)
        torch.testing.assert_close(run(merged, batch), expected, rtol=1e-4, atol=1e-4)
    else:
        with pytest.raises((U.AdapterError, U.ConfigError), match="cannot (be )?merge"):
            loaded.merge_and_unload()
        torch.testing.assert_close(run(loaded, batch), expected, rtol=1e-5, atol=1e-5)
