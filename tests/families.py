"""Tiny random models of every supported family, built from configs (no downloads)."""
from __future__ import annotations

import torch
import transformers as T

VOCAB = 100

_CONFIGS = {
    "bert": lambda: T.BertConfig(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64),
    "roberta": lambda: T.RobertaConfig(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64, pad_token_id=1),
    "deberta": lambda: T.DebertaConfig(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64),
    "deberta-v2": lambda: T.DebertaV2Config(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64),
    "gpt2": lambda: T.GPT2Config(vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=4, n_positions=64, bos_token_id=1, eos_token_id=2, pad_token_id=0),
    "bloom": lambda: T.BloomConfig(vocab_size=VOCAB, hidden_size=32, n_layer=2, n_head=4, bos_token_id=1, eos_token_id=2, pad_token_id=0),
    "opt": lambda: T.OPTConfig(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, ffn_dim=64, word_embed_proj_dim=32, max_position_embeddings=64, bos_token_id=1, eos_token_id=2, pad_token_id=0),
    "gpt_neo": lambda: T.GPTNeoConfig(vocab_size=VOCAB, hidden_size=32, num_layers=2, num_heads=4, attention_types=[[["global", "local"], 1]], max_position_embeddings=64, bos_token_id=1, eos_token_id=2, pad_token_id=0),
    "gptj": lambda: T.GPTJConfig(vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=4, rotary_dim=4, n_positions=64, bos_token_id=1, eos_token_id=2, pad_token_id=0),
    "t5": lambda: T.T5Config(vocab_size=VOCAB, d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4, decoder_start_token_id=0, pad_token_id=0, eos_token_id=1),
    "bart": lambda: T.BartConfig(vocab_size=VOCAB, d_model=32, encoder_layers=2, decoder_layers=2, encoder_attention_heads=4, decoder_attention_heads=4, encoder_ffn_dim=64, decoder_ffn_dim=64, max_position_embeddings=64, pad_token_id=1, bos_token_id=0, eos_token_id=2, decoder_start_token_id=2, forced_eos_token_id=None),
    "llama": lambda: T.LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64, bos_token_id=1, eos_token_id=2, pad_token_id=0),
    "qwen2": lambda: T.Qwen2Config(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64, bos_token_id=1, eos_token_id=2, pad_token_id=0),
    "mistral": lambda: T.MistralConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64, bos_token_id=1, eos_token_id=2, pad_token_id=0),
}

ENCODERS = ("bert", "roberta", "deberta", "deberta-v2")
ENCODER_DECODERS = ("t5", "bart")
DECODERS = ("gpt2", "bloom", "opt", "gpt_neo", "gptj", "llama", "qwen2", "mistral")
FAMILIES = tuple(_CONFIGS)

_AUTO = {
    "SEQ_CLS": T.AutoModelForSequenceClassification,
    "CAUSAL_LM": T.AutoModelForCausalLM,
    "SEQ_2_SEQ_LM": T.AutoModelForSeq2SeqLM,
    "TOKEN_CLS": T.AutoModelForTokenClassification,
    "FEATURE_EXTRACTION": T.AutoModel,
}


def tasks_of(family: str) -> tuple[str, ...]:
    if family in ENCODERS:
        return ("SEQ_CLS", "TOKEN_CLS", "FEATURE_EXTRACTION")
    if family in ENCODER_DECODERS:
        return ("SEQ_CLS", "SEQ_2_SEQ_LM")
    return ("SEQ_CLS", "CAUSAL_LM")


MATRIX = [(f, t) for f in FAMILIES for t in tasks_of(f)]


def make_config(family: str):
    config = _CONFIGS[family]()
    config.num_labels = 3
    return config


def make_model(family: str, task: str, seed: int = 0) -> torch.nn.Module:
    """The same random weights for the same (family, task, seed), in eval mode (no dropout)."""
    torch.manual_seed(seed)
    model = _AUTO[task].from_config(make_config(family))
    return model.eval()


def make_batch(family: str, task: str, batch: int = 3, length: int = 6, seed: int = 1) -> dict:
    """Inputs (and labels, for a loss) that every forward of this (family, task) accepts."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, VOCAB, (batch, length), generator=g)
    if family in ENCODER_DECODERS:  # their classifiers pool the hidden state at the final <eos>
        ids[:, -1] = make_config(family).eos_token_id
    out = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    if task == "SEQ_CLS":
        out["labels"] = torch.randint(0, 3, (batch,), generator=g)
    elif task == "TOKEN_CLS":
        out["labels"] = torch.randint(0, 3, (batch, length), generator=g)
    elif task == "CAUSAL_LM":
        out["labels"] = ids.clone()
    elif task == "SEQ_2_SEQ_LM":
        out["labels"] = torch.randint(3, VOCAB, (batch, 4), generator=g)
    return out


def output_tensor(out) -> torch.Tensor:
    """The main output to compare: logits, or the last hidden state for feature extraction."""
    return out.logits if hasattr(out, "logits") and out.logits is not None else out.last_hidden_state
