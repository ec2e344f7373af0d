"""Shared fixtures: tiny datasets in the real layouts, trained tiny runs, a free port, state resets (plain helpers are
in tests/helpers.py)."""
import os
import random
import socket

import numpy as np
import pytest
import torch

import main_pretrain_multi_datasets_xray as vit_main
import main_pretrain_multi_datasets_xray_cnn as cnn_main
from data.synthetic import make_reference_layout
from tests.helpers import train_in_process


def pytest_configure(config):
    """Under pytest-xdist each worker gets one intra-op thread: `make test` runs one worker per core, and two threads
    per worker on two cores made the in-process training tests several times slower (the child processes the tests
    start already get OMP_NUM_THREADS=1 from tests/helpers.child_env)."""
    if os.environ.get("PYTEST_XDIST_WORKER"):
        torch.set_num_threads(1)


def pytest_report_header(config):
    """The free space where the tests write: the documented commands save full-size checkpoints, and a passed test's
    folder is deleted when it ends (pyproject.toml), so a full `make test` peaks near 3.5 GB. A disk that fills shows
    up as a run of setup errors; this line says why before they start."""
    import shutil
    import tempfile

    folder = os.path.abspath(config.getoption("basetemp") or tempfile.gettempdir())
    disk = folder
    while not os.path.isdir(disk):  # a --basetemp pytest has not made yet lies on its nearest existing parent's disk
        disk = os.path.dirname(disk)
    free = shutil.disk_usage(disk).free
    return f"test folders under {folder}: {free / 2**30:.1f} GiB free (a full make test needs about 3.5 GiB)"


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


@pytest.fixture(scope="session")
def runs(tiny_data, tmp_path_factory):
    """Checkpoints of one-epoch runs on the tiny fixture: ViT and CNN, each with and without norm_pix_loss."""
    root = tmp_path_factory.mktemp("runs")
    return {
        "vit": train_in_process(vit_main, tiny_data[0], str(root / "vit"), input_size=64),
        "vit_npl": train_in_process(vit_main, tiny_data[0], str(root / "vit_npl"), input_size=64, norm_pix_loss=True),
        "cnn": train_in_process(cnn_main, tiny_data[0], str(root / "cnn"), model="densenet121", input_size=64),
        "cnn_npl": train_in_process(cnn_main, tiny_data[0], str(root / "cnn_npl"), model="resnet50", input_size=64,
                          norm_pix_loss=True),
    }
