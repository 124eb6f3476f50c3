import os

import pytest
import torch

# one pytest process per core under pytest-xdist (`make test` runs -n auto): each uses its share of the cores
_workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1") or 1)
torch.set_num_threads(max(1, min(2, (os.cpu_count() or 1) // _workers)))


@pytest.fixture(scope="session")
def tiny():
    from algo.models import load_model
    return load_model("tiny")


@pytest.fixture()
def fresh_tiny():
    from algo.models import load_model
    return load_model("tiny")
