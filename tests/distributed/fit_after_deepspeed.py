"""tests/test_distributed.py: a fit under DeepSpeed, then a fit without an engine in the same process, which
must train with the plain loop (Accelerate leaves ACCELERATE_USE_DEEPSPEED=true behind).

    DS_ACCELERATOR=cpu torchrun --nproc_per_node 1 tests/distributed/fit_after_deepspeed.py OUT_DIR
"""
import json
import os
import sys

import matrix
from unipeft.train.trainer import fit

out = sys.argv[1]
for name, engine in (("deepspeed", matrix.CPU_ENGINES["zero1"]), ("after", None)):
    model = matrix.model_for("lora")
    options = matrix.options("ddp", processes=1)
    options.engine, options.epochs = engine, 1
    fit(model, matrix.TRAIN, matrix.collate, None, None, False, options, os.path.join(out, name), log=lambda _: None)
    with open(os.path.join(out, name, "checkpoint", "trainer_state.json")) as fh:
        print(name, json.load(fh)["engine"])
