"""The `unipeft train` workflow: data (data.py), model and method choice (model.py, methods.py),
the training loop (loop.py) and the glue that writes a run folder (run.py).

Importing this package is cheap; torch and transformers load when a run starts.
"""
from .errors import UsageError

__all__ = ["UsageError"]
