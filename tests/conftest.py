import os

import pytest
import torch

# one pytest process per core under pytest-xdist (`make test` runs -n auto): each uses its share of the cores
_workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1") or 1)
_threads = max(1, min(2, (os.cpu_count() or 1) // _workers))
torch.set_num_threads(_threads)
# ... and so do the command-line runs the tests start (host/cli.py follows OMP_NUM_THREADS): two torch
# threads per process on a machine whose cores the other worker keeps busy make a forward pass 10-30x slower
os.environ.setdefault("OMP_NUM_THREADS", str(_threads))


@pytest.fixture(scope="session")
def tiny():
    from algo.models import load_model
    return load_model("tiny")


@pytest.fixture()
def fresh_tiny():
    from algo.models import load_model
    return load_model("tiny")
