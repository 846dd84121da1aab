"""One test per assumption in `unipeft.compat` (test_<function>), each failing with a message that names the
assumption when a transformers release breaks it; and the rule that nothing else in src/ reads transformers'
private names."""
from __future__ import annotations

import ast
import inspect
import os
import re
import subprocess
import sys
import tomllib
import warnings
from pathlib import Path

import pytest
import torch
from packaging.version import Version
import transformers
from transformers.cache_utils import Cache, DynamicCache

import families as F
from unipeft import LoraConfig, compat, get_peft_model
from unipeft.engine.sites import body_of

ROOT = Path(__file__).resolve().parents[1]
SRC = ROOT / "src" / "unipeft"
NO_CACHE = {"deberta", "deberta-v2"}  # attention that takes no cache at all


def broken(assumption: str, detail: str) -> str:
    return f"compat.{assumption} no longer holds on transformers {transformers.__version__}: {detail}"


def stack_of(model):
    """Where a prefix goes: the decoder of an encoder-decoder model, else the body."""
    return model.get_decoder() if model.config.is_encoder_decoder else body_of(model)


# ---- the tested range ------------------------------------------------------------------------------------------
def test_every_compat_function_has_its_test():
    functions = [name for name, value in vars(compat).items()
                 if inspect.isfunction(value) and value.__module__ == compat.__name__ and not name.startswith("_")]
    tests = {name for name in globals() if name.startswith("test_")}
    assert functions and not [f for f in functions if f"test_{f}" not in tests]


def test_untested_transformers():
    low, high = compat.TESTED_TRANSFORMERS
    major, minor = (int(part) for part in high.split(".")[:2])
    assert compat.untested_transformers(low) is None
    assert compat.untested_transformers(f"{high}.3") is None
    for outside in ("4.57.6", f"{major}.{minor + 1}.0", f"{major + 1}.0.0", "main"):
        message = compat.untested_transformers(outside)
        assert message and outside in message and f"{low} to {high}.x" in message
    declared = re.search(r'"transformers>=([\d.]+),<(\d+)"', (ROOT / "pyproject.toml").read_text())
    assert declared and Version(declared.group(1)) == Version(low), "pyproject's lower bound is the oldest tested release"
    assert int(declared.group(2)) == major + 1
    locked = re.search(r"^transformers==([\d.]+)$", (ROOT / "requirements" / "lock.txt").read_text(), re.M)
    assert locked and compat.untested_transformers(locked.group(1)) is None, "the lock holds a tested release"


def test_installed_transformers():
    assert compat.installed_transformers() == transformers.__version__, broken(
        "installed_transformers", "transformers/__init__.py no longer holds its __version__ line")


def test_warn_if_untested(tmp_path):
    """`import unipeft` with an untested transformers warns exactly once, naming the range; a tested one never."""
    fake = tmp_path / "transformers"
    fake.mkdir()
    (fake / "__init__.py").write_text('__version__ = "4.40.0"\n')
    code = "import unipeft"
    env = {**os.environ, "PYTHONPATH": str(tmp_path)}
    run = subprocess.run([sys.executable, "-W", "always", "-c", code], env=env, capture_output=True, text=True)
    assert run.returncode == 0, run.stderr
    assert run.stderr.count("UserWarning") == 1 and "4.40.0" in run.stderr
    assert f"{compat.TESTED_TRANSFORMERS[0]} to {compat.TESTED_TRANSFORMERS[1]}.x" in run.stderr
    env.pop("PYTHONPATH")
    run = subprocess.run([sys.executable, "-W", "always", "-c", code], env=env, capture_output=True, text=True)
    expected = 0 if compat.untested_transformers() is None else 1
    assert run.stderr.count("UserWarning") == expected, run.stderr


RUNTIME = ("transformers", "accelerate", "safetensors", "tqdm", "torch")
VERSIONS_START, VERSIONS_END = "<!-- versions -->\n", "<!-- /versions -->"


def render_versions() -> str:
    """The README's versions table, from pyproject, the lock and what scripts/compat.sh pins for `oldest`."""
    declared = {re.match(r"[A-Za-z0-9_.-]+", d).group(): d for d in
                tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]}
    locked = dict(re.findall(r"^([A-Za-z0-9_.-]+)==(\S+)$", (ROOT / "requirements" / "lock.txt").read_text(), re.M))
    compat_sh = (ROOT / "scripts" / "compat.sh").read_text()
    pinned = re.search(r'TORCH_VERSION="([\d.]+)"', (ROOT / "scripts" / "_setup.sh").read_text()).group(1)
    rows = ["| package | pyproject | `compat.sh oldest` | lock (whole suite) |", "|---|---|---|---|"]
    for package in RUNTIME:
        spec = declared[package][len(package):]
        lowest = re.match(r">=([\d.]+)", spec).group(1)
        oldest = lowest if re.search(rf"for package in [^;]*\b{package}\b", compat_sh) else pinned
        rows.append(f"| {package} | {spec} | {oldest} | {locked[package]} |")
    return "\n".join(rows) + "\n"


def test_readme_versions_table_is_current():
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    assert text.split(VERSIONS_START, 1)[1].split(VERSIONS_END, 1)[0] == render_versions(), (
        "README's versions table is stale: python tests/test_compat.py --write")


# ---- call signatures ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("family,task", F.MATRIX, ids=[f"{f}-{t}" for f, t in F.MATRIX])
def test_cache_keyword(family, task):
    """The stack a prefix goes to names its cache argument, and takes a cache under that name without
    deprecation: a forward with an empty cache fills it with the input's keys and values."""
    model = F.make_model(family, task)
    stack = stack_of(model)
    keyword = compat.cache_keyword(stack)
    if family in NO_CACHE:
        assert keyword is None, broken("cache_keyword", f"{family} now takes a cache ({keyword})")
        return
    assert keyword in compat.CACHE_KEYWORDS, broken("cache_keyword", f"{type(stack).__name__} takes no cache argument")
    batch = F.make_batch(family, task)
    cache = compat.empty_cache(model.config, model.config.is_encoder_decoder)
    inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
    if model.config.is_encoder_decoder:
        inputs = {"input_ids": batch["input_ids"][:, :2],
                  "encoder_hidden_states": torch.randn(3, 6, model.config.d_model)}
    with warnings.catch_warnings():
        warnings.simplefilter("error", FutureWarning)
        stack(**inputs, use_cache=True, **{keyword: cache})
    assert cache.get_seq_length() == inputs["input_ids"].shape[1], broken("cache_keyword", "the cache stayed empty")


def test_call_cache():
    cache = object()
    assert compat.call_cache({"cache": cache}) is cache
    assert compat.call_cache({"past_key_values": cache, "use_cache": True}) is cache
    assert compat.call_cache({"cache": None, "past_key_values": cache}) is cache
    assert compat.call_cache({"input_ids": 1}) is None


@pytest.mark.parametrize("family,task", [("llama", "CAUSAL_LM"), ("gpt2", "CAUSAL_LM"), ("t5", "SEQ_2_SEQ_LM")])
def test_output_cache(family, task):
    model = F.make_model(family, task)
    batch = {k: v for k, v in F.make_batch(family, task).items() if k != "labels"}
    if task == "SEQ_2_SEQ_LM":
        batch["decoder_input_ids"] = batch["input_ids"][:, :2]
    out = model(**batch, use_cache=True)
    cache = compat.output_cache(out)
    assert isinstance(cache, Cache), broken("output_cache", f"{type(out).__name__} carries no cache field")
    expected = 2 if task == "SEQ_2_SEQ_LM" else batch["input_ids"].shape[1]
    assert cache.get_seq_length() == expected


@pytest.mark.parametrize("family", F.ENCODER_DECODERS)
def test_attention_reads_cache(family):
    """Each encoder layer has one attention module that reads a cache, each decoder layer two (self, cross),
    and their layer_idx values number the layers."""
    model = F.make_model(family, "SEQ_2_SEQ_LM")
    layers = model.config.num_layers if family == "t5" else model.config.encoder_layers
    encoder = [m for m in model.get_encoder().modules() if compat.attention_reads_cache(m)]
    decoder = [m for m in model.get_decoder().modules() if compat.attention_reads_cache(m)]
    assert sorted(m.layer_idx for m in encoder) == list(range(layers)), broken(
        "attention_reads_cache", f"found {len(encoder)} encoder attention modules for {layers} layers")
    assert sorted(m.layer_idx for m in decoder) == sorted(list(range(layers)) * 2), broken(
        "attention_reads_cache", f"found {len(decoder)} decoder attention modules for {layers} layers")


def test_relative_position_bias():
    model = F.make_model("t5", "SEQ_2_SEQ_LM")
    first, second = (block.layer[0].SelfAttention for block in model.encoder.block)
    bias = compat.relative_position_bias(first, 5, torch.device("cpu"))
    assert bias is not None and bias.shape == (1, model.config.num_heads, 5, 5), broken(
        "relative_position_bias", "the first T5 layer no longer owns a [1, heads, q, k] bias")
    # bias[i, j] depends on j - i only (relative positions): constant along each diagonal
    assert torch.equal(bias[0, :, 1:, 1:], bias[0, :, :-1, :-1])
    assert compat.relative_position_bias(second, 5, torch.device("cpu")) is None


# ---- caches ------------------------------------------------------------------------------------------------------
def _prefix(model, t=3, seed=0):
    config = model.config
    g = torch.Generator().manual_seed(seed)
    heads, dim = config.num_key_value_heads, config.hidden_size // config.num_attention_heads
    return [(torch.randn(1, heads, t, dim, generator=g), torch.randn(1, heads, t, dim, generator=g))
            for _ in range(config.num_hidden_layers)]


def test_frozen_prefix_cache():
    """Attention over a frozen prefix cache equals attention over a stock cache holding the same keys and values,
    and the frozen cache stores nothing (a recomputed layer sees the same prefix)."""
    model = F.make_model("llama", "CAUSAL_LM").model
    ids = torch.randint(3, F.VOCAB, (1, 5), generator=torch.Generator().manual_seed(1))
    prefix = _prefix(model)
    stock = DynamicCache(config=model.config)
    for i, (k, v) in enumerate(prefix):
        stock.update(k, v, i)
    keyword = compat.cache_keyword(model)
    positions = torch.arange(3, 8)[None]
    expected = model(input_ids=ids, position_ids=positions, **{keyword: stock}).last_hidden_state
    frozen = compat.frozen_prefix_cache(prefix)
    for _ in range(2):
        got = model(input_ids=ids, position_ids=positions, use_cache=False, **{keyword: frozen}).last_hidden_state
        torch.testing.assert_close(got, expected, msg=broken("frozen_prefix_cache", "outputs differ from a stock cache"))
        assert frozen.get_seq_length() == 3, broken("frozen_prefix_cache", "the frozen cache grew")


def test_encoder_decoder_cache():
    """With recompute_cross the cross-attention half never remembers encoder keys: a second call with other
    encoder states attends to those, not to the first call's."""
    model = F.make_model("bart", "SEQ_2_SEQ_LM")
    decoder, keyword = model.get_decoder(), compat.cache_keyword(model.get_decoder())
    layers = model.config.decoder_layers
    ids = torch.tensor([[5, 6]])
    first, second = torch.randn(1, 4, 32), torch.randn(1, 4, 32)

    def call(states, cache):
        return decoder(input_ids=ids, encoder_hidden_states=states, use_cache=False, **{keyword: cache}).last_hidden_state

    def fresh():
        empty = [(None, None)] * layers
        return compat.encoder_decoder_cache(compat.frozen_prefix_cache(empty), compat.frozen_prefix_cache(empty),
                                            recompute_cross=True)

    cache = fresh()
    call(first, cache)
    torch.testing.assert_close(call(second, cache), call(second, fresh()),
                               msg=broken("encoder_decoder_cache", "cross-attention reused stored keys"))
    assert not any(cache.is_updated.get(i) for i in range(layers))


def test_cache_halves():
    model = F.make_model("t5", "SEQ_2_SEQ_LM")
    pair = compat.empty_cache(model.config, encoder_decoder=True)
    halves = compat.cache_halves(pair)
    assert halves is not None and all(isinstance(h, Cache) for h in halves), broken(
        "cache_halves", "EncoderDecoderCache has no self_attention_cache/cross_attention_cache")
    assert compat.cache_halves(DynamicCache(config=model.config)) is None


@pytest.mark.parametrize("family", ["llama", "mistral", "t5"])
def test_empty_cache(family):
    """generate() on an empty cache of ours decodes exactly what generate() decodes with its own."""
    task = "SEQ_2_SEQ_LM" if family == "t5" else "CAUSAL_LM"
    model = F.make_model(family, task)
    batch = {k: v for k, v in F.make_batch(family, task, batch=1).items() if k != "labels"}
    cache = compat.empty_cache(model.config, model.config.is_encoder_decoder)
    assert cache.get_seq_length() == 0
    settings = dict(max_new_tokens=4, do_sample=False, pad_token_id=0)
    theirs = model.generate(**batch, **settings)
    ours = model.generate(**batch, **settings, **{compat.cache_keyword(model): cache})
    assert torch.equal(ours, theirs), broken("empty_cache", "generate() decodes differently with our cache")
    assert cache.get_seq_length() > 0, broken("empty_cache", "generate() did not use the cache we passed")


def test_allow_checkpointing_with_cache():
    """Under gradient checkpointing a layer drops the cache before its attention sees it, unless allowed; the
    allowance is removed again."""
    model = F.make_model("llama", "CAUSAL_LM").model
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.train()
    ids = torch.randint(3, F.VOCAB, (1, 5), generator=torch.Generator().manual_seed(1))
    class Seen(Exception):
        pass

    def stop(module, args, kwargs):  # what attention receives; the rest of the forward is not needed
        raise Seen(compat.call_cache(kwargs))

    model.layers[0].self_attn.register_forward_pre_hook(stop, with_kwargs=True)

    def attention_gets_cache() -> bool:
        cache = compat.frozen_prefix_cache(_prefix(model))
        with pytest.raises(Seen) as seen:
            model(input_ids=ids, use_cache=False, **{compat.cache_keyword(model): cache})
        return seen.value.args[0] is cache

    assert not attention_gets_cache(), broken("allow_checkpointing_with_cache",
                                              "checkpointed layers no longer drop the cache by default")
    compat.allow_checkpointing_with_cache(model, True)
    assert attention_gets_cache(), broken("allow_checkpointing_with_cache",
                                          "the flag no longer lets checkpointed layers keep the cache")
    compat.allow_checkpointing_with_cache(model, False)
    assert not attention_gets_cache()


# ---- model classes and their attributes ------------------------------------------------------------------------
@pytest.mark.parametrize("family", [f for f in F.FAMILIES if f not in ("deberta", "deberta-v2")])  # they name none
def test_no_split_modules(family):
    model = F.make_model(family, F.tasks_of(family)[-1])
    names = compat.no_split_modules(model)
    classes = {type(m).__name__ for m in model.modules()}
    assert names & classes, broken("no_split_modules", f"{type(model).__name__} names no block class it contains")
    peft = get_peft_model(model, LoraConfig(task_type=F.tasks_of(family)[-1], r=2))
    assert compat.no_split_modules(peft) == names


def test_is_conv1d():
    gpt2 = F.make_model("gpt2", "CAUSAL_LM")
    conv = gpt2.transformer.h[0].attn.c_attn
    assert compat.is_conv1d(conv), broken("is_conv1d", "GPT-2's c_attn is not transformers' Conv1D")
    x = torch.randn(2, conv.weight.shape[0])
    torch.testing.assert_close(conv(x), x @ conv.weight + conv.bias, msg=broken("is_conv1d", "weight is not [in, out]"))
    assert not compat.is_conv1d(F.make_model("llama", "CAUSAL_LM").model.layers[0].self_attn.q_proj)


def test_linear_dims():
    # what each layer maps, read from what it computes: a [2, in] input gives a [2, out] output
    conv = F.make_model("gpt2", "CAUSAL_LM").transformer.h[0].attn.c_attn  # 32 -> 96 (q, k, v)
    linear = torch.nn.Linear(5, 7)
    for layer, transposed in ((conv, True), (linear, False)):
        in_features, out_features, flag = compat.linear_dims(layer)
        assert layer(torch.randn(2, in_features)).shape == (2, out_features) and flag is transposed, \
            broken("linear_dims", f"{type(layer).__name__} does not map {in_features} -> {out_features}")


def test_is_exact_conv1d():
    conv = F.make_model("gpt2", "CAUSAL_LM").transformer.h[0].attn.c_attn
    assert compat.is_exact_conv1d(conv)
    subclass = type("Custom", (type(conv),), {})
    assert not compat.is_exact_conv1d(subclass(4, 4)) and compat.is_conv1d(subclass(4, 4))


@pytest.mark.parametrize("family,task", F.MATRIX, ids=[f"{f}-{t}" for f, t in F.MATRIX])
def test_task_model_classes(family, task):
    model = F.make_model(family, task)
    tables = compat.task_model_classes()
    assert type(model).__name__ in tables[task].get(model.config.model_type, ()), broken(
        "task_model_classes", f"{type(model).__name__} is missing from the {task} table")


def test_name_or_path(tmp_path):
    model = F.make_model("bert", "SEQ_CLS")
    assert compat.name_or_path(model.config) is None
    model.save_pretrained(tmp_path)
    loaded = transformers.AutoModelForSequenceClassification.from_pretrained(tmp_path)
    assert compat.name_or_path(loaded.config) == str(tmp_path), broken("name_or_path", "the loaded folder is not recorded")


@pytest.mark.parametrize("family,task", [("gpt2", "CAUSAL_LM"), ("bart", "SEQ_2_SEQ_LM"), ("roberta", "SEQ_CLS"),
                                         ("opt", "CAUSAL_LM"), ("bert", "SEQ_CLS"), ("llama", "CAUSAL_LM")])
def test_position_limit(family, task):
    """The limit is what the model itself allows: `limit` tokens run, `limit + 1` fail."""
    model = F.make_model(family, task)
    stack = model.get_encoder() if model.config.is_encoder_decoder else body_of(model)
    limit = compat.position_limit(stack)
    if family == "llama":
        assert limit is None
        return
    for length, fits in ((limit, True), (limit + 1, False)):
        ids = torch.full((1, length), 5)
        try:
            stack(input_ids=ids)
            ran = True
        except (IndexError, RuntimeError):
            ran = False
        assert ran == fits, broken("position_limit", f"{family}: {length} tokens {'failed' if fits else 'ran'}")


@pytest.mark.parametrize("family", F.FAMILIES)
def test_token_embeddings(family):
    """Feeding the stack `token_embeddings(stack)(ids)` as inputs_embeds equals feeding it the ids."""
    task = F.tasks_of(family)[-1]
    model = F.make_model(family, task)
    stack = model.get_encoder() if model.config.is_encoder_decoder else body_of(model)
    ids = F.make_batch(family, task)["input_ids"]
    embeds = compat.token_embeddings(stack)(ids)
    torch.testing.assert_close(stack(inputs_embeds=embeds).last_hidden_state, stack(input_ids=ids).last_hidden_state,
                               msg=broken("token_embeddings", f"{family}: inputs_embeds differ from the ids' embedding"))


def test_quiet_loading(tmp_path, capfd):
    from transformers.utils import logging as hf_logging

    before = hf_logging.get_verbosity()
    with compat.quiet_loading():
        assert hf_logging.get_verbosity() == hf_logging.ERROR and not hf_logging.is_progress_bar_enabled()
        hf_logging.get_logger("transformers").warning("should not show")
    assert hf_logging.get_verbosity() == before
    assert "should not show" not in capfd.readouterr().err


# ---- nothing else reads transformers' private names --------------------------------------------------------------
def _private_transformers_names() -> set[str]:
    """Single-underscore names that transformers' own source defines or reads as attributes."""
    names = set()
    for path in Path(transformers.__file__).parent.rglob("*.py"):
        names.update(re.findall(r"\.(_[a-zA-Z][a-zA-Z0-9_]*)\b", path.read_text(encoding="utf-8", errors="ignore")))
    return {n for n in names if not n.startswith("__")}


# Private names unipeft reads that belong to other libraries (transformers' source uses them too)
OTHER_OWNERS = {
    "_parameters": "torch.nn.Module", "_forward_hooks": "torch.nn.Module", "_forward_pre_hooks": "torch.nn.Module",
    "_global_forward_hooks": "torch.nn.modules.module", "_global_forward_pre_hooks": "torch.nn.modules.module",
    "_BatchNorm": "torch.nn.modules.batchnorm", "_ConvNd": "torch.nn.modules.conv",
    "_InstanceNorm": "torch.nn.modules.instancenorm", "_actions": "argparse", "_subparsers": "argparse",
    "_group_actions": "argparse", "_shared_state": "accelerate.state", "_reset_state": "accelerate.state",
}


def test_no_private_transformers_names_outside_compat():
    ours, used = set(), []
    for path in SRC.rglob("*.py"):
        tree = ast.parse(path.read_text(encoding="utf-8"))
        for node in ast.walk(tree):
            if isinstance(node, (ast.FunctionDef, ast.ClassDef, ast.AsyncFunctionDef)):
                ours.add(node.name)
            elif (isinstance(node, ast.Attribute) and isinstance(node.ctx, ast.Store)
                  and isinstance(node.value, ast.Name) and node.value.id in ("self", "cls")):
                ours.add(node.attr)  # an attribute our own classes set
            elif isinstance(node, ast.Name) and isinstance(node.ctx, ast.Store):
                ours.add(node.id)
            elif isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("transformers"):
                if path.name != "compat.py" and not (node.module.startswith("transformers.integrations")
                                                      or node.module == "transformers"):
                    used.append(f"{path.relative_to(ROOT)}: from {node.module} import ...")
        if path.name != "compat.py":
            used += [f"{path.relative_to(ROOT)}: .{node.attr}" for node in ast.walk(tree)
                     if isinstance(node, ast.Attribute) and node.attr.startswith("_") and not node.attr.startswith("__")]
    theirs = _private_transformers_names() - set(OTHER_OWNERS)
    private = [u for u in used if "import" in u or (u.split(".")[-1] in theirs and u.split(".")[-1] not in ours)]
    assert not private, "transformers internals read outside unipeft/compat.py:\n" + "\n".join(private)


if __name__ == "__main__":  # python tests/test_compat.py --write: rewrite the README's versions table
    if sys.argv[1:] == ["--write"]:
        readme = ROOT / "README.md"
        head, rest = readme.read_text(encoding="utf-8").split(VERSIONS_START, 1)
        readme.write_text(head + VERSIONS_START + render_versions() + VERSIONS_END + rest.split(VERSIONS_END, 1)[1],
                          encoding="utf-8")
    else:
        print(render_versions(), end="")
