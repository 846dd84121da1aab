"""tests/test_distributed.py: `fit(resume=True)` under an engine continues exactly where the run stopped.

    DS_ACCELERATOR=cpu torchrun --nproc_per_node 2 tests/distributed/resume.py ENGINE OUT_DIR METHOD [METHOD ...]

Per method: a straight run of 12 steps, and a run interrupted at its second evaluation (step 6) then resumed
from its checkpoint (step 3); OUT_DIR/METHOD/{straight,resumed}.safetensors hold each one's final trainable
tensors (the best evaluation's, reloaded), gathered; each run's checkpoint/trainable.safetensors the last step's.
"""
import os
import sys

import torch
from accelerate.state import PartialState
from safetensors.torch import save_file

import matrix
from train_methods import zero3_config
from unipeft.train.engines import full_trainable
from unipeft.train.plan import is_main_process
from unipeft.train.trainer import fit


class Interrupted(Exception):
    pass


def run(engine: str, method: str, run_dir: str, stop_at: int | None = None, resume: bool = False) -> dict:
    model = matrix.model_for(method)
    options = matrix.options(engine, int(os.environ["WORLD_SIZE"]))
    if engine == "zero3":
        options.engine = zero3_config(os.path.dirname(run_dir))
    calls = []

    def evaluate():
        calls.append(1)
        if len(calls) == stop_at:
            raise Interrupted
        return {"loss": matrix.held_out_loss(model)}

    try:
        fit(model, matrix.TRAIN, matrix.collate, evaluate, "loss", False, options, run_dir, resume=resume,
            log=lambda _: None)
    except Interrupted:
        pass
    return full_trainable(model)


def main() -> None:
    engine, out_dir, methods = sys.argv[1], sys.argv[2], sys.argv[3:]
    PartialState(cpu=matrix.DEVICE == "cpu")
    for method in methods:
        out = os.path.join(out_dir, method)
        os.makedirs(out, exist_ok=True)
        straight = run(engine, method, os.path.join(out, "straight"))
        run(engine, method, os.path.join(out, "interrupted"), stop_at=2)
        resumed = run(engine, method, os.path.join(out, "interrupted"), resume=True)
        if is_main_process():
            save_file(straight, os.path.join(out, "straight.safetensors"))
            save_file(resumed, os.path.join(out, "resumed.safetensors"))
        torch.distributed.barrier()


if __name__ == "__main__":
    main()
