"""Where method knowledge may live: the command line, the training workflow and PeftModel reach methods only
through the registry (unipeft.registry), and the engine's code names no method (its comments may use one as
an example), so adding a method never edits them."""
from __future__ import annotations

import ast
import re
import pathlib

SRC = pathlib.Path(__file__).resolve().parent.parent / "src" / "unipeft"


def imported_modules(path: pathlib.Path) -> set[str]:
    """Absolute names of every module `path` imports (relative imports resolved against its package)."""
    package = ["unipeft", *path.relative_to(SRC).parent.parts]
    names = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.ImportFrom):
            base = package[:len(package) - node.level + 1] if node.level else []
            module = ".".join(base + ([node.module] if node.module else []))
            names |= {module} | {f"{module}.{alias.name}" for alias in node.names}
        elif isinstance(node, ast.Import):
            names |= {alias.name for alias in node.names}
    return names


def test_imported_modules_resolves_relative_imports():
    train_methods = SRC / "train" / "methods.py"
    assert "unipeft.registry" in imported_modules(train_methods)  # `from ..registry import ...`
    assert "unipeft.methods.lora" in imported_modules(SRC / "methods" / "adalora.py")  # `from .lora import ...`


def test_cli_train_and_peft_model_import_no_method_module():
    files = [SRC / "cli.py", SRC / "peft_model.py", *sorted((SRC / "train").glob("*.py"))]
    offenders = {str(f.relative_to(SRC)): sorted(m for m in imported_modules(f) if m.startswith("unipeft.methods"))
                 for f in files}
    assert {f: m for f, m in offenders.items() if m} == {}


def test_the_engine_imports_no_method_and_no_prompt_machinery():
    """Methods and the virtual-token hooks build on the engine, never the other way round."""
    offenders = {str(f.relative_to(SRC)): sorted(m for m in imported_modules(f)
                                                 if m.startswith(("unipeft.methods", "unipeft.virtual")))
                 for f in sorted((SRC / "engine").glob("*.py"))}
    assert {f: m for f, m in offenders.items() if m} == {}


def test_the_engine_stays_within_its_line_budget():  # issue 18's target
    lines = sum(len(p.read_text(encoding="utf-8").splitlines()) for p in (SRC / "engine").glob("*.py"))
    assert lines <= 1500, f"engine/ has {lines} lines; the budget is 1,500"


METHOD_WORDS = {"lora", "dora", "loha", "lokr", "oft", "adalora", "ia3", "bitfit", "houlsby", "pfeiffer", "idpg",
                "mam", "vera", "bottleneck"}


def words(text: str) -> set[str]:
    """'LoraLinear' -> {'lora', 'linear'}; 'lora_only' -> {'lora', 'only'}; 'IA3Config' -> {'ia3', 'config'}."""
    return {w.lower() for w in re.findall(r"[A-Z][a-z]+|[A-Z0-9]+(?![a-z])|[a-z0-9]+", text)}


def code_words(path: pathlib.Path) -> set[str]:
    """Words of every identifier and string in `path`'s code: docstrings and comments (examples) left out."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    docstrings = {id(node.body[0].value) for node in ast.walk(tree)
                  if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef))
                  and node.body and isinstance(node.body[0], ast.Expr) and isinstance(node.body[0].value, ast.Constant)}
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in docstrings:
            found |= words(node.value)
        elif isinstance(node, ast.Name):
            found |= words(node.id)
        elif isinstance(node, ast.Attribute):
            found |= words(node.attr)
        elif isinstance(node, (ast.FunctionDef, ast.ClassDef, ast.arg)):
            found |= words(getattr(node, "name", None) or node.arg)
    return found


def test_words_splits_identifiers():
    assert words("LoraLinear lora_only IA3Config adalora") == {"lora", "linear", "only", "ia3", "config", "adalora"}
    assert {"lora", "dora"} <= code_words(SRC / "methods" / "lora.py")  # the detector sees a method file's code


def test_the_engine_names_no_method():
    named = {str(f.relative_to(SRC)): sorted(code_words(f) & METHOD_WORDS) for f in sorted((SRC / "engine").glob("*.py"))}
    assert {f: w for f, w in named.items() if w} == {}


def test_every_default_target_table_covers_every_supported_family():
    from unipeft.engine.sites import FAMILIES
    from unipeft.registry import get_method, known_peft_types

    tables = {t: get_method(t).default_targets for t in known_peft_types() if get_method(t).default_targets}
    assert {"LORA", "ADALORA", "IA3", "LOHA", "LOKR", "OFT"} <= set(tables)
    assert {t: sorted(set(FAMILIES) ^ set(table)) for t, table in tables.items() if set(table) != set(FAMILIES)} == {}


MAX_FILE_LINES, MAX_FUNCTION_LINES = 400, 60  # issue 18's targets: short files of one purpose, short functions


def long_functions(source: str) -> list[tuple[str, int]]:
    """(name, lines) of each function over MAX_FUNCTION_LINES, argument tables (add_*_parser) excepted."""
    return [(node.name, node.end_lineno - node.lineno + 1) for node in ast.walk(ast.parse(source))
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef))
            and node.end_lineno - node.lineno + 1 > MAX_FUNCTION_LINES
            and not re.fullmatch(r"add_\w+_parser", node.name)]


def test_long_functions_counts_lines_and_spares_argument_tables():
    body = "\n".join(f"    x{i} = {i}" for i in range(MAX_FUNCTION_LINES))
    source = f"def long():\n{body}\n\ndef add_train_parser():\n{body}\n\ndef short():\n    pass\n"
    assert long_functions(source) == [("long", MAX_FUNCTION_LINES + 1)]


def test_source_files_and_functions_stay_short():
    too_long = {str(p.relative_to(SRC)): n for p in SRC.rglob("*.py")
                if (n := len(p.read_text(encoding="utf-8").splitlines())) > MAX_FILE_LINES}
    assert not too_long, f"files over {MAX_FILE_LINES} lines: {too_long}"
    functions = {str(p.relative_to(SRC)): found for p in SRC.rglob("*.py")
                 if (found := long_functions(p.read_text(encoding="utf-8")))}
    assert not functions, f"functions over {MAX_FUNCTION_LINES} lines: {functions}"
