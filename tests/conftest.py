import os

import pytest
import torch

torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


@pytest.fixture(scope="session")
def tiny():
    from algo.models import load_model
    return load_model("tiny")


@pytest.fixture()
def fresh_tiny():
    from algo.models import load_model
    return load_model("tiny")
