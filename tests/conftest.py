import os
import sys

import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
sys.path.insert(0, os.path.dirname(__file__))

# Test models are tiny: one intra-op thread per xdist worker is many times faster than threads
# competing for the same cores.
torch.set_num_threads(1)


# ---- transformers deprecations raised through unipeft fail the test ------------------------------------------
# transformers keeps an old name working for a few releases with a FutureWarning (or a logged "deprecated"
# message) before removing it; failing on those while unipeft is on the stack catches the next rename while the
# old name still works. A test's own calls into transformers are not checked.
import inspect  # noqa: E402
import logging  # noqa: E402
import warnings  # noqa: E402

import pytest  # noqa: E402

import unipeft  # noqa: E402

UNIPEFT_SOURCE = os.path.dirname(unipeft.__file__) + os.sep


def unipeft_frame(frame):
    """The innermost unipeft frame on the stack above `frame`, or None."""
    while frame is not None:
        if frame.f_code.co_filename.startswith(UNIPEFT_SOURCE):
            return frame
        frame = frame.f_back
    return None


def from_transformers(frame) -> bool:
    return frame.f_globals.get("__name__", "").split(".")[0] == "transformers"


class DeprecationsThroughUnipeft(logging.Handler):
    def __init__(self):
        super().__init__(logging.WARNING)
        self.found: list[str] = []

    def note(self, message: str, origin) -> None:
        where = unipeft_frame(origin)
        if where is not None:
            self.found.append(f"{message} (through {where.f_code.co_filename}:{where.f_lineno})")

    def emit(self, record: logging.LogRecord) -> None:
        message = record.getMessage()
        if "deprecat" in message.lower():
            self.note(message, inspect.currentframe())

    def warn(self, original):
        def checked(message, category=None, stacklevel=1, source=None, **kwargs):
            kind = category or (type(message) if isinstance(message, Warning) else UserWarning)
            caller = sys._getframe(1)
            if issubclass(kind, (FutureWarning, DeprecationWarning)) and from_transformers(caller):
                self.note(str(message), caller)
            return original(message, category, stacklevel + 1, source, **kwargs)
        return checked


@pytest.fixture(autouse=True)
def no_transformers_deprecation_through_unipeft(monkeypatch):
    handler = DeprecationsThroughUnipeft()
    monkeypatch.setattr(warnings, "warn", handler.warn(warnings.warn))
    logger = logging.getLogger("transformers")
    level, shown = logger.level, [(h, h.level) for h in logger.handlers]
    for other, other_level in shown:  # what transformers prints stays as quiet as before
        other.setLevel(max(other_level, level))
    logger.setLevel(min(level, logging.WARNING) if level else logging.WARNING)
    logger.addHandler(handler)
    try:
        yield handler
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)
        for other, other_level in shown:
            other.setLevel(other_level)
    if handler.found:
        pytest.fail("transformers deprecation raised through unipeft:\n" + "\n".join(dict.fromkeys(handler.found)))


# ---- the command-line tests' tiny model and data (tests/cli_helpers.py) ------------------------------------------
@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory) -> str:
    from cli_helpers import write_tiny_model

    return write_tiny_model(tmp_path_factory.mktemp("tiny-bert"))


@pytest.fixture(scope="module")
def tiny_csv(tmp_path_factory) -> str:
    from cli_helpers import texts, write_csv

    rows = [(i, text, label) for i, (text, label) in enumerate(texts(0, 600))]
    return write_csv(tmp_path_factory.mktemp("data") / "reviews.csv", ["id", "text", "label"], rows)
