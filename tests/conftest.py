"""Shared fixtures: tiny datasets in the real layouts, a free port, state resets (helpers are in tests/helpers.py)."""
import random
import socket

import numpy as np
import pytest
import torch

from data.synthetic import make_reference_layout


@pytest.fixture(autouse=True)
def _reset_global_state():
    torch.manual_seed(0)
    np.random.seed(0)
    random.seed(0)
    dtype = torch.get_default_dtype()
    yield
    torch.set_default_dtype(dtype)
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory):
    """(data_path, expected counts) with CheXpert-small, NIH and MIMIC in the reference layout."""
    root = tmp_path_factory.mktemp("data")
    return str(root), make_reference_layout(str(root), size=(40, 48))


@pytest.fixture
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
