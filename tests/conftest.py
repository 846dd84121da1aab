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
