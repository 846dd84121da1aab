"""Generation and in-context learning pieces of `unipeft train|test|infer` (unipeft.train.generation).

Everything is checked against slow hand computations: one unpadded forward per example, argmax loops for
generation, log-softmax sums for scores. The tokenizer is byte-level with no merges, built offline, so a
string of n ASCII characters is exactly n tokens and token counts can be worked out from the text itself.
"""
from __future__ import annotations

import math

import pytest
import torch
import transformers as T
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors

import unipeft
from unipeft.train.data import Example
from unipeft.train.generation import (
    CausalCollator, Seq2SeqCollator, generate_texts, icl_prompt, perplexity, pick_demos,
    score_label_words,
)

EOS, PAD = 256, 257  # ids after the 256 byte symbols
VOCAB = 258
PROMPTS = ["ab", "Review: great film\nSentiment:", "hello there"]


def make_tokenizer(append_eos: bool = False) -> T.PreTrainedTokenizerFast:
    """One token per byte; with append_eos, inputs and targets end with <eos> as T5's tokenizer does."""
    vocab = {c: i for i, c in enumerate(sorted(pre_tokenizers.ByteLevel.alphabet()))}
    vocab.update({"<eos>": EOS, "<pad>": PAD})
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    if append_eos:
        tok.post_processor = processors.TemplateProcessing(single="$A <eos>", special_tokens=[("<eos>", EOS)])
    return T.PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<eos>", pad_token="<pad>")


def gpt2(seed: int = 0, init: float = 0.02):
    torch.manual_seed(seed)
    config = T.GPT2Config(vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=2, n_positions=128, bos_token_id=EOS,
                          eos_token_id=EOS, pad_token_id=PAD, initializer_range=init,
                          resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    return T.GPT2LMHeadModel(config).eval()


def seq2seq(family: str, seed: int = 0):
    """Wider initial weights than the defaults, so greedy decoding does not stop at once."""
    torch.manual_seed(seed)
    if family == "t5":
        config = T.T5Config(vocab_size=VOCAB, d_model=32, d_kv=16, d_ff=64, num_layers=2, num_heads=2,
                            dropout_rate=0.0, decoder_start_token_id=PAD, pad_token_id=PAD, eos_token_id=EOS,
                            initializer_factor=5.0)
    else:
        config = T.BartConfig(vocab_size=VOCAB, d_model=32, encoder_layers=2, decoder_layers=2,
                              encoder_attention_heads=2, decoder_attention_heads=2, encoder_ffn_dim=64,
                              decoder_ffn_dim=64, max_position_embeddings=128, dropout=0.0, pad_token_id=PAD,
                              bos_token_id=EOS, eos_token_id=EOS, decoder_start_token_id=EOS,
                              forced_bos_token_id=None, forced_eos_token_id=None, init_std=0.2)
    return T.AutoModelForSeq2SeqLM.from_config(config).eval()


def lora(model, task: str):
    peft = unipeft.get_peft_model(model, unipeft.LoraConfig(task_type=task, r=4))
    with torch.no_grad():  # B starts at zero: make the adapter change the model
        for name, p in peft.named_parameters():
            if "lora_B" in name:
                p.normal_(0.0, 0.5)
    return peft.eval()


def with_method(method: str, seed: int = 0):
    model = gpt2(seed)
    if method == "plain":
        return model
    if method == "lora":
        return lora(model, "CAUSAL_LM")
    torch.manual_seed(seed + 1)
    config = (unipeft.PromptTuningConfig if method == "prompt" else unipeft.PrefixTuningConfig)(
        task_type="CAUSAL_LM", num_virtual_tokens=4)
    return unipeft.get_peft_model(model, config).eval()


def ids(tok, text: str) -> list[int]:
    return tok(text, add_special_tokens=False)["input_ids"]


def log_probs_after(logits_rows: torch.Tensor, context: int, targets: list[int]) -> list[float]:
    """log p(targets[i]) read at position context - 1 + i of one row of logits."""
    lp = logits_rows.float().log_softmax(-1)
    return [lp[context - 1 + i, t].item() for i, t in enumerate(targets)]


# ---- collators ----------------------------------------------------------------------------------

def prompt_of(e: Example) -> str:
    return f"x: {e.text}\ny:"


def answer_of(e: Example) -> str:
    return " " + e.target


CAUSAL_EXAMPLES = [Example("a b", target="b a"), Example("longer input here", target="ok"),
                   Example("c", target="a much longer answer")]


def test_causal_collator_masks_prompt_and_padding_and_keeps_answer_with_eos():
    tok = make_tokenizer()
    batch = CausalCollator(tok, prompt_of, answer_of, max_length=64)(CAUSAL_EXAMPLES)
    lengths = [(len(prompt_of(e)), len(answer_of(e)) + 1) for e in CAUSAL_EXAMPLES]  # bytes = tokens; +1: eos
    width = max(p + a for p, a in lengths)
    assert batch["input_ids"].shape == batch["labels"].shape == (3, width)
    for row, (e, (p, a)) in enumerate(zip(CAUSAL_EXAMPLES, lengths)):
        answer = ids(tok, answer_of(e)) + [EOS]
        assert batch["input_ids"][row].tolist() == ids(tok, prompt_of(e)) + answer + [PAD] * (width - p - a)
        assert batch["attention_mask"][row].tolist() == [1] * (p + a) + [0] * (width - p - a)
        assert batch["labels"][row].tolist() == [-100] * p + answer + [-100] * (width - p - a)
    assert tok.padding_side == "right"


def test_causal_collator_truncates_the_prompt_from_the_left():
    tok = make_tokenizer()
    e = Example("one two three four five", target="yes")
    batch = CausalCollator(tok, prompt_of, answer_of, max_length=12)([e])
    room = 12 - len(" yes") - 1
    kept = prompt_of(e)[-room:]
    assert batch["input_ids"][0].tolist() == ids(tok, kept) + ids(tok, " yes") + [EOS]
    assert batch["labels"][0].tolist() == [-100] * room + ids(tok, " yes") + [EOS]


def test_causal_lm_loss_on_a_collated_batch_covers_the_answer_tokens_only():
    tok, model = make_tokenizer(), gpt2()
    batch = CausalCollator(tok, prompt_of, answer_of, max_length=64)(CAUSAL_EXAMPLES)
    with torch.no_grad():
        loss = model(**batch).loss.item()
        nll, count = 0.0, 0
        for e in CAUSAL_EXAMPLES:
            prompt, answer = ids(tok, prompt_of(e)), ids(tok, answer_of(e)) + [EOS]
            logits = model(input_ids=torch.tensor([prompt + answer])).logits[0]
            nll -= sum(log_probs_after(logits, len(prompt), answer))
            count += len(answer)
    assert loss == pytest.approx(nll / count, rel=1e-5)


@pytest.mark.parametrize("family", ["t5", "bart"])
def test_seq2seq_collator_labels_and_model_loss(family):
    tok, model = make_tokenizer(append_eos=True), seq2seq(family)
    examples = [Example("a long article text", target="short"), Example("tiny", target="a longer summary")]
    source = lambda e: "summarize: " + e.text  # noqa: E731
    batch = Seq2SeqCollator(tok, source, max_source_length=64, max_target_length=64)(examples)
    src_width = max(len(source(e)) + 1 for e in examples)
    tgt_width = max(len(e.target) + 1 for e in examples)
    for row, e in enumerate(examples):
        n, m = len(source(e)) + 1, len(e.target) + 1
        assert batch["input_ids"][row].tolist() == ids(tok, source(e)) + [EOS] + [PAD] * (src_width - n)
        assert batch["attention_mask"][row].tolist() == [1] * n + [0] * (src_width - n)
        assert batch["labels"][row].tolist() == ids(tok, e.target) + [EOS] + [-100] * (tgt_width - m)
    with torch.no_grad():
        loss = model(**batch).loss.item()
        nll, count = 0.0, 0
        for e in examples:
            target = ids(tok, e.target) + [EOS]
            decoder = [model.config.decoder_start_token_id] + target[:-1]
            logits = model(input_ids=torch.tensor([ids(tok, source(e)) + [EOS]]),
                           decoder_input_ids=torch.tensor([decoder])).logits[0]
            nll -= sum(log_probs_after(logits, 1, target))
            count += len(target)
    assert loss == pytest.approx(nll / count, rel=1e-5)
    short = Seq2SeqCollator(tok, source, max_source_length=8, max_target_length=4)(examples)
    assert short["input_ids"].shape[1] == 8 and short["labels"][1].tolist() == ids(tok, "a l") + [EOS]


# ---- generation ---------------------------------------------------------------------------------

def greedy_by_hand(model, tok, prompt: str, steps: int) -> str:
    row = tok(prompt)["input_ids"]
    new: list[int] = []
    with torch.no_grad():
        for _ in range(steps):
            token = int(model(input_ids=torch.tensor([row + new])).logits[0, -1].argmax())
            if token == EOS:
                break
            new.append(token)
    return tok.decode(new, skip_special_tokens=True).split("\n")[0].strip()


def seq2seq_greedy_by_hand(model, tok, text: str, steps: int) -> str:
    encoder = torch.tensor([tok(text)["input_ids"]])
    decoder = [model.config.decoder_start_token_id]
    with torch.no_grad():
        for _ in range(steps):
            token = int(model(input_ids=encoder, decoder_input_ids=torch.tensor([decoder])).logits[0, -1].argmax())
            if token == EOS:
                break
            decoder.append(token)
    return tok.decode(decoder[1:], skip_special_tokens=True).strip()


@pytest.mark.parametrize("method", ["plain", "lora", "prompt", "prefix"])
def test_greedy_generation_matches_an_argmax_loop(method):
    tok, model = make_tokenizer(), with_method(method)
    expected = [greedy_by_hand(model, tok, p, 6) for p in PROMPTS]
    assert any(expected) and len(set(expected)) > 1  # the comparison is not between empty strings
    got = generate_texts(model, tok, PROMPTS, decoder_only=True, max_new_tokens=6, max_length=64, batch_size=2)
    assert got == expected
    assert tok.padding_side == "right"
    beam1 = generate_texts(model, tok, PROMPTS, decoder_only=True, search="beam", num_beams=1, max_new_tokens=6,
                           max_length=64)
    assert beam1 == expected


def test_lora_changes_what_is_generated():
    tok = make_tokenizer()
    base = [greedy_by_hand(gpt2(), tok, p, 6) for p in PROMPTS]
    tuned = generate_texts(with_method("lora"), tok, PROMPTS, decoder_only=True, max_new_tokens=6, max_length=64)
    assert tuned != base


@pytest.mark.parametrize("family,adapted", [("t5", False), ("bart", False), ("t5", True)])
def test_seq2seq_greedy_generation_matches_a_decoder_loop(family, adapted):
    tok, model = make_tokenizer(append_eos=True), seq2seq(family)
    if adapted:
        model = lora(model, "SEQ_2_SEQ_LM")
    texts = ["summarize: short", "summarize: a much longer input text", "translate: hi"]
    expected = [seq2seq_greedy_by_hand(model, tok, t, 6) for t in texts]
    assert any(expected)
    got = generate_texts(model, tok, texts, decoder_only=False, max_new_tokens=6, max_length=64, batch_size=2)
    assert got == expected
    assert generate_texts(model, tok, texts, decoder_only=False, search="beam", num_beams=1, max_new_tokens=6,
                          max_length=64) == expected
    assert len(generate_texts(model, tok, texts, decoder_only=False, search="beam", num_beams=3,
                              max_new_tokens=6, max_length=64)) == 3


class ScriptedModel:
    """A stand-in whose generate() appends fixed tokens and records what it was given."""

    def __init__(self, continuation: list[int]):
        self.continuation, self.calls = continuation, []

    def eval(self):
        return self

    def generate(self, input_ids, attention_mask, **options):
        self.calls.append((input_ids, attention_mask, options))
        tail = torch.tensor(self.continuation).expand(input_ids.shape[0], -1)
        return torch.cat([input_ids, tail], dim=1)


def test_decoder_only_output_drops_the_prompt_stops_at_a_newline_and_pads_left():
    tok = make_tokenizer()
    model = ScriptedModel(ids(tok, " yes it is\nnext line") + [EOS, PAD])
    got = generate_texts(model, tok, ["ab", "abcd"], decoder_only=True, search="beam", num_beams=3,
                         max_length=3)
    assert got == ["yes it is", "yes it is"]
    input_ids, attention_mask, options = model.calls[0]
    assert input_ids.tolist() == [[PAD] + ids(tok, "ab"), ids(tok, "bcd")]  # left padding, left truncation
    assert attention_mask.tolist() == [[0, 1, 1], [1, 1, 1]]
    assert options["num_beams"] == 3 and options["early_stopping"] and not options["do_sample"]


def test_unknown_search_is_refused():
    with pytest.raises(ValueError, match="search"):
        generate_texts(gpt2(), make_tokenizer(), ["a"], decoder_only=True, search="sample", max_length=8)


# ---- perplexity ---------------------------------------------------------------------------------

@pytest.mark.parametrize("method", ["plain", "prompt"])
def test_perplexity_weighs_every_token_equally_across_uneven_batches(method):
    tok, model = make_tokenizer(), with_method(method)
    collate = CausalCollator(tok, prompt_of, answer_of, max_length=64)
    loader = [collate(CAUSAL_EXAMPLES[:1]), collate(CAUSAL_EXAMPLES[1:])]
    nll, count = 0.0, 0
    with torch.no_grad():
        for e in CAUSAL_EXAMPLES:
            prompt, answer = ids(tok, prompt_of(e)), ids(tok, answer_of(e)) + [EOS]
            logits = model(input_ids=torch.tensor([prompt + answer])).logits[0, -len(prompt + answer):]
            nll -= sum(log_probs_after(logits, len(prompt), answer))
            count += len(answer)
        per_batch = [model(**b).loss.item() for b in loader]
    assert perplexity(model, loader, "cpu") == pytest.approx(math.exp(nll / count), rel=1e-5)
    assert math.exp(nll / count) != pytest.approx(math.exp(sum(per_batch) / len(per_batch)), rel=1e-3)


def test_seq2seq_perplexity_uses_labels_without_a_shift():
    tok, model = make_tokenizer(append_eos=True), seq2seq("t5")
    examples = [Example("one", target="a"), Example("two words", target="longer target"), Example("x", target="b")]
    collate = Seq2SeqCollator(tok, lambda e: e.text, 64, 64)
    loader = [collate(examples[:2]), collate(examples[2:])]
    nll, count = 0.0, 0
    with torch.no_grad():
        for e in examples:
            target = ids(tok, e.target) + [EOS]
            logits = model(input_ids=torch.tensor([ids(tok, e.text) + [EOS]]),
                           decoder_input_ids=torch.tensor([[PAD] + target[:-1]])).logits[0]
            nll -= sum(log_probs_after(logits, 1, target))
            count += len(target)
    assert perplexity(model, loader, "cpu") == pytest.approx(math.exp(nll / count), rel=1e-5)


# ---- in-context learning ------------------------------------------------------------------------

WORDS = ["no", "yes", "maybe"]  # 3, 4 and 6 tokens with the leading space


def word_score_by_hand(model, tok, prompt: str, word: str) -> float:
    context, target = tok(prompt)["input_ids"], ids(tok, " " + word)
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([context + target])).logits[0, -len(context + target):]
    return sum(log_probs_after(logits, len(context), target))


@pytest.mark.parametrize("method", ["plain", "lora", "prompt"])
def test_label_word_scores_are_summed_log_probabilities(method):
    tok, model = make_tokenizer(), with_method(method)
    expected = [[word_score_by_hand(model, tok, p, w) for w in WORDS] for p in PROMPTS]
    got = score_label_words(model, tok, PROMPTS, WORDS, device="cpu", batch_size=4, max_length=64)
    assert len(got) == len(PROMPTS) and all(len(row) == len(WORDS) for row in got)
    for row, want in zip(got, expected):
        assert row == pytest.approx(want, rel=1e-5, abs=1e-5)


def test_long_prompts_lose_their_beginning_when_scored():
    tok, model = make_tokenizer(), gpt2()
    prompt = "a long preamble that will not fit\nReview: fine\nSentiment:"
    got = score_label_words(model, tok, [prompt], WORDS, max_length=20)[0]
    kept = [word_score_by_hand(model, tok, prompt[-(20 - len(" " + w)):], w) for w in WORDS]
    full = [word_score_by_hand(model, tok, prompt, w) for w in WORDS]
    assert got == pytest.approx(kept, rel=1e-5, abs=1e-5)
    assert got != pytest.approx(full, rel=1e-3)


def test_seq2seq_label_words_are_scored_as_decoder_targets():
    tok, model = make_tokenizer(append_eos=True), seq2seq("t5")
    expected = []
    with torch.no_grad():
        for p in PROMPTS:
            row = []
            for w in WORDS:
                target = ids(tok, " " + w)
                logits = model(input_ids=torch.tensor([tok(p)["input_ids"]]),
                               decoder_input_ids=torch.tensor([[PAD] + target[:-1]])).logits[0]
                row.append(sum(log_probs_after(logits, 1, target)))
            expected.append(row)
    got = score_label_words(model, tok, PROMPTS, WORDS, batch_size=5, max_length=64)
    for row, want in zip(got, expected):
        assert row == pytest.approx(want, rel=1e-5, abs=1e-5)


def test_icl_prompt_joins_solved_demos_and_the_query():
    prompt = lambda e: f"Review: {e.text}\nSentiment:"  # noqa: E731
    answer = lambda e: " " + ["negative", "positive"][e.label]  # noqa: E731
    demos = [Example("great film", 1), Example("dull", 0)]
    assert icl_prompt(demos, Example("fun ride"), prompt, answer) == (
        "Review: great film\nSentiment: positive\n\n"
        "Review: dull\nSentiment: negative\n\n"
        "Review: fun ride\nSentiment:")
    assert icl_prompt([], Example("fun ride"), prompt, answer) == "Review: fun ride\nSentiment:"
    assert icl_prompt(demos[:1], Example("x"), prompt, answer, separator="\n") == (
        "Review: great film\nSentiment: positive\nReview: x\nSentiment:")


def test_pick_demos_balances_classes_and_follows_the_seed():
    train = ([Example(f"zero {i}", 0) for i in range(10)] + [Example(f"one {i}", 1) for i in range(5)]
             + [Example(f"two {i}", 2) for i in range(2)])
    counts = lambda demos: [sum(d.label == c for d in demos) for c in range(3)]  # noqa: E731
    six = pick_demos(train, 6, seed=0, labels=3)
    assert counts(six) == [2, 2, 2] and len(set(six)) == 6 and all(d in train for d in six)
    nine = counts(pick_demos(train, 9, seed=0, labels=3))
    assert nine[2] == 2 and sorted(nine[:2]) == [3, 4]  # class 2 runs out; the others stay within one
    assert pick_demos(train, 6, seed=0, labels=3) == six
    assert pick_demos(train, 6, seed=1, labels=3) != six
    assert pick_demos(train, 0, seed=0, labels=3) == []
    plain = pick_demos(train, 5, seed=0, labels=None)
    assert len(set(plain)) == 5 and all(d in train for d in plain) and plain == pick_demos(train, 5, 0, None)
    assert len(pick_demos(train, 50, seed=0, labels=3)) == len(train)


# ---- learning -----------------------------------------------------------------------------------

def test_lora_learns_a_mapping_and_generate_returns_it():
    """Swap two letters: after 80 full-batch steps the greedy answers on the training prompts are right."""
    tok = make_tokenizer()
    pairs = [("a b", "b a"), ("c d", "d c"), ("b c", "c b"), ("d a", "a d"), ("a c", "c a"), ("b d", "d b")]
    examples = [Example(x, target=y) for x, y in pairs]
    model = unipeft.get_peft_model(gpt2(seed=0, init=0.2), unipeft.LoraConfig(
        task_type="CAUSAL_LM", r=8, lora_alpha=16, target_modules=["c_attn", "c_proj", "c_fc"]))
    prompts = [prompt_of(e) for e in examples]
    targets = [e.target for e in examples]
    assert generate_texts(model, tok, prompts, decoder_only=True, max_new_tokens=6, max_length=32) != targets
    batch = CausalCollator(tok, prompt_of, answer_of, max_length=32)(examples)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    model.train()
    for _ in range(80):
        model(**batch).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    assert generate_texts(model, tok, prompts, decoder_only=True, max_new_tokens=6, max_length=32) == targets
