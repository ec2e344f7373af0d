"""util/checkpoint.py: safe loading, atomic saves, pruning, the write probe."""
import argparse
import datetime
import os
import re
import sys

import numpy as np
import pytest
import torch

import models_mae
from tests.helpers import VIT_SCRIPT, run_cli, tiny_run_args
from util import checkpoint as ckpt_lib


class _Payload:
    def __reduce__(self):
        return (os.system, ("touch pwned-by-checkpoint",))


@pytest.mark.slow
def test_malicious_checkpoint_is_refused(tmp_path, tiny_data):
    evil = tmp_path / "evil.pth"
    torch.save({"model": {}, "epoch": 0, "args": _Payload()}, evil)
    with pytest.raises(ckpt_lib.UnsafeCheckpointError, match="refused to load .*evil.pth"):
        ckpt_lib.load_checkpoint(str(evil))
    assert not (tmp_path / "pwned-by-checkpoint").exists()
    out = tmp_path / "run"
    proc = run_cli([sys.executable, VIT_SCRIPT, *tiny_run_args(tiny_data[0], str(out), resume=str(evil))],
                   expect_rc=None, cwd=tmp_path)
    assert proc.returncode == 1 and "refused to load" in proc.stdout, proc.output
    assert not (tmp_path / "pwned-by-checkpoint").exists() and "Traceback" not in proc.stderr


def test_reference_checkpoint_with_namespace_args_loads(tmp_path):
    model = models_mae.create_model("mae_vit_debug_patch16", img_size=32)
    path = tmp_path / "reference.pth"
    torch.save({"model": model.state_dict(), "epoch": 19, "scaler": {},
                "args": argparse.Namespace(model="mae_vit_small_patch16_dec128d2b", blr=1.5e-4, input_size=224)}, path)
    ckpt = ckpt_lib.load_checkpoint(str(path))
    assert ckpt["args"]["blr"] == 1.5e-4 and ckpt_lib.progress_of(ckpt) == (20, 0)
    # the allow-list admits the Namespace and nothing more: another pickled class is refused, naming the file
    other = tmp_path / "reference-with-a-date.pth"
    torch.save({"model": model.state_dict(), "epoch": 19, "args": argparse.Namespace(model="x"),
                "saved_at": datetime.date(2022, 5, 1)}, other)
    with pytest.raises(ckpt_lib.UnsafeCheckpointError, match=rf"refused to load {re.escape(str(other))}: it contains"
                                                          r".*datetime.*--unsafe_full_unpickle"):
        ckpt_lib.load_checkpoint(str(other))
    assert ckpt_lib.load_checkpoint(str(other), trust_pickle=True)["saved_at"] == datetime.date(2022, 5, 1)


def test_reference_checkpoint_with_numpy_values_loads(tmp_path):
    """As the reference's misc.save_model writes them: model, optimizer, epoch, scaler and the parsed args as a
    Namespace, whose values (and other keys) may be numpy scalars and dtypes: all on the allow-list, no flag needed."""
    model = torch.nn.Linear(3, 2)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    model(torch.ones(1, 3)).sum().backward()
    optimizer.step()
    args = argparse.Namespace(model="mae_vit_small_patch16", blr=np.float64(1.5e-4), mask_ratio=np.float32(0.9),
                              batch_size=np.int64(256), norm_pix_loss=np.bool_(False), dtype=np.dtype("float32"))
    path = tmp_path / "checkpoint-799.pth"
    torch.save({"model": model.state_dict(), "optimizer": optimizer.state_dict(), "epoch": np.int64(799),
                "scaler": {"scale": np.float64(65536.0)}, "args": args}, path)
    ckpt = ckpt_lib.load_checkpoint(str(path))
    assert ckpt["args"]["blr"] == pytest.approx(1.5e-4) and ckpt["args"]["dtype"] == np.dtype("float32")
    assert int(ckpt["epoch"]) == 799 and torch.equal(ckpt["model"]["weight"], model.weight)


def test_a_file_that_is_no_checkpoint_is_named(tmp_path):
    text, truncated = tmp_path / "notes.pth", tmp_path / "half.pth"
    text.write_text("not a checkpoint\n")
    torch.save({"model": {"w": torch.ones(100)}}, tmp_path / "whole.pth")
    truncated.write_bytes((tmp_path / "whole.pth").read_bytes()[:200])
    for path in (text, truncated):
        with pytest.raises(ValueError, match=rf"{re.escape(str(path))} is not a readable checkpoint") as raised:
            ckpt_lib.load_checkpoint(str(path))
        assert "weights_only" not in str(raised.value)  # torch's advice to unpickle everything does not apply


def test_atomic_save_failure_keeps_previous(tmp_path):
    path = str(tmp_path / "checkpoint-last.pth")
    ckpt_lib.atomic_save({"epoch": 1, "w": torch.ones(3)}, path)

    class Explodes:
        def __reduce__(self):
            raise RuntimeError("disk went away mid-write")

    with pytest.raises(RuntimeError, match="disk went away"):
        ckpt_lib.atomic_save({"epoch": 2, "w": torch.zeros(1000), "bad": Explodes()}, path)
    assert ckpt_lib.load_checkpoint(path)["epoch"] == 1
    assert os.listdir(tmp_path) == ["checkpoint-last.pth"]


def test_keep_last_prunes_periodic_only(tmp_path):
    for epoch in range(5):
        ckpt_lib.atomic_save({"epoch": epoch}, str(tmp_path / f"checkpoint-{epoch}.pth"))
    ckpt_lib.atomic_save({"epoch": 4}, str(tmp_path / "checkpoint-last.pth"))
    ckpt_lib.prune_periodic(str(tmp_path), keep_last=2)
    assert sorted(os.listdir(tmp_path)) == ["checkpoint-3.pth", "checkpoint-4.pth", "checkpoint-last.pth"]


@pytest.mark.slow
def test_unwritable_output_dir_is_clear(tiny_data, tmp_path):
    blocker = tmp_path / "a_file"
    blocker.write_text("x")
    proc = run_cli([sys.executable, VIT_SCRIPT, *tiny_run_args(tiny_data[0], str(blocker / "out"))], expect_rc=1)
    assert "--output_dir" in proc.stdout and "is not writable" in proc.stdout, proc.output


def test_rng_state_round_trip_on_cpu_has_no_cuda_part():
    state = ckpt_lib.rng_state(torch.device("cpu"))
    assert "cuda" not in state
    expected = torch.rand(3)
    ckpt_lib.set_rng_state(state, torch.device("cpu"))
    assert torch.equal(torch.rand(3), expected)


def test_cuda_rng_state_is_the_training_devices_across_launchers(caplog):
    """Saved under torchrun (8 visible GPUs, old format: a list per rank) and resumed under srun --gpus-per-task=1
    (one visible GPU, index 0): each rank restores the state of the GPU it trained on, its local rank."""
    per_gpu = [torch.full((16,), k, dtype=torch.uint8) for k in range(8)]
    assert torch.equal(ckpt_lib.cuda_state_for({"cuda": per_gpu}, local_rank=3), per_gpu[3])
    assert ckpt_lib.cuda_state_for({"cuda": per_gpu[5]}, local_rank=0) is per_gpu[5]  # this format: one device
    with caplog.at_level("WARNING"):
        assert ckpt_lib.cuda_state_for({"cuda": per_gpu[:2]}, local_rank=4) is None
    assert "none for local rank 4" in caplog.text
    state = {**ckpt_lib.rng_state(torch.device("cpu")), "cuda": per_gpu[0]}
    ckpt_lib.set_rng_state(state, torch.device("cpu"), local_rank=0)  # a CPU resume of a GPU run: said, not fatal
    assert "it is not restored" in caplog.text
