import os

import pytest
import torch

# Forked gloo workers inherit this; one thread each keeps 8 ranks on 2 cores sane
# and avoids forking a parent with a live OpenMP pool.
torch.set_num_threads(1)
os.environ.setdefault("WANDB_MODE", "offline")


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs CUDA")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
