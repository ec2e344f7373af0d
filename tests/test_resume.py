"""Never lose a cluster week: pre-emption, a damaged checkpoint-last, non-finite steps, a reference checkpoint resumed.

Killed ranks and nodes: tests/test_faults.py and tests/test_multinode.py; safe loading: tests/util/test_checkpoint.py.
"""
import argparse
import os
import re
import signal
import sys

import pytest
import torch

import engine
import main_pretrain_multi_datasets_xray as vit_main
import models_mae
from engine_pretrain import PretrainTask
from tests.helpers import (
    VIT_SCRIPT,
    NaNInjectingMAE,
    check_fp16_overflow_is_a_scaler_skip,
    in_process_args,
    last_checkpoint,
    run_cli,
    spawn,
    tiny_run_args,
    wait_for_line,
)
from tests.reference_impl import reference_param_groups
from util import checkpoint as ckpt_lib
from util.args import ExitCode


@pytest.mark.slow
def test_sigterm_writes_checkpoint_and_exits_with_requeue_code(tiny_data, tmp_path):
    out = str(tmp_path)
    proc = spawn([sys.executable, VIT_SCRIPT, *tiny_run_args(tiny_data[0], out, input_size=64, batch_size=2,
                                                             epochs=200)])
    wait_for_line(proc, r"Epoch: \[0\]\s+\[\s*2/")
    proc.send_signal(signal.SIGTERM)
    rest, _ = proc.communicate(timeout=60)
    assert proc.returncode == ExitCode.PREEMPTED, rest
    assert "received SIGTERM" in rest and "pre-empted" in rest
    ckpt = last_checkpoint(out)
    assert ckpt["epoch"] < 199 and ckpt_lib.progress_of(ckpt) > (0, 2)
    resumed = run_cli([sys.executable, VIT_SCRIPT, *tiny_run_args(tiny_data[0], out, input_size=64, batch_size=2,
                                                                  epochs=1)], expect_rc=0)
    assert "resumed from" in resumed.stdout


@pytest.mark.slow
def test_truncated_checkpoint_last_falls_back_to_previous(tiny_data, tmp_path):
    out = str(tmp_path)
    run_cli([sys.executable, VIT_SCRIPT, *tiny_run_args(tiny_data[0], out, epochs=2, save_freq=1)])
    last = tmp_path / "checkpoint-last.pth"
    last.write_bytes(last.read_bytes()[: last.stat().st_size // 2])
    os.utime(last)  # the newest file, so it is tried first
    proc = run_cli([sys.executable, VIT_SCRIPT, *tiny_run_args(tiny_data[0], out, epochs=3, save_freq=1)])
    assert "checkpoint-last.pth is damaged" in proc.stdout
    assert re.search(r"resumed from .*checkpoint-1.pth: epoch 2, step 0", proc.stdout), proc.output
    assert last_checkpoint(out)["epoch"] == 2


def test_nan_batch_is_skipped_and_counted(tiny_data, tmp_path):
    args = in_process_args(vit_main, tiny_data[0], str(tmp_path))
    model = NaNInjectingMAE({3}, img_size=args.input_size)
    assert engine.run(PretrainTask(lambda a: model), args) == 0
    # the weights before and after the bad step are identical; other steps change them
    assert torch.equal(model.snapshots[2], model.snapshots[3])
    assert not torch.equal(model.snapshots[3], model.snapshots[4])
    line = (tmp_path / "log.txt").read_text().splitlines()[-1]
    assert '"train_bad_steps": 1' in line


def test_fp16_overflow_is_a_scaler_skip_not_a_step(tiny_data, tmp_path):
    """fp16 with the GradScaler and fused AdamW on CPU (tests/test_gpu.py runs it on CUDA)."""
    check_fp16_overflow_is_a_scaler_skip(tiny_data[0], tmp_path, "cpu")


def test_nan_k_in_a_row_stops_after_checkpoint(tiny_data, tmp_path, caplog):
    args = in_process_args(vit_main, tiny_data[0], str(tmp_path), max_bad_steps=3)
    model = NaNInjectingMAE({2, 3, 4, 5}, img_size=args.input_size)
    assert engine.run(PretrainTask(lambda a: model), args) == 2
    assert "--precision bf16" in caplog.text and "--clip_grad" in caplog.text and "lower --blr" in caplog.text
    ckpt = last_checkpoint(str(tmp_path))
    assert ckpt["bad_steps_total"] == 3 and ckpt["step"] == 4
    assert torch.equal(ckpt["model"]["blocks.0.attn.qkv.weight"], model.snapshots[1])  # last good weights


def _reference_format_checkpoint(path, epoch=0, steps=2):
    """What the reference's save_model writes after `epoch`: weights, an AdamW over timm's add_weight_decay groups
    with `steps` steps of state, the fp16 NativeScaler's state, and the parsed args as a pickled Namespace."""
    torch.manual_seed(3)
    model = models_mae.create_model("mae_vit_debug_patch16", img_size=32)
    optimizer = torch.optim.AdamW(reference_param_groups(model, 0.05), lr=1e-4, betas=(0.9, 0.95))
    for _ in range(steps):
        for p in model.parameters():
            p.grad = torch.randn_like(p) if p.requires_grad else None
        optimizer.step()
    scaler = {"scale": 65536.0, "growth_factor": 2.0, "backoff_factor": 0.5, "growth_interval": 2000,
              "_growth_tracker": 0}
    args = argparse.Namespace(model="mae_vit_debug_patch16", batch_size=4, epochs=800, blr=1.5e-4, mask_ratio=0.75,
                              input_size=32, datasets_names=["chexpert", "chestxray_nih"], output_dir=str(path.parent))
    torch.save({"model": model.state_dict(), "optimizer": optimizer.state_dict(), "epoch": epoch, "scaler": scaler,
                "args": args}, path)
    return model, optimizer


@pytest.mark.slow
def test_reference_format_checkpoint_resumes_with_its_optimizer_state(tiny_data, tmp_path):
    ref_path = tmp_path / "reference-checkpoint-0.pth"
    _, ref_optimizer = _reference_format_checkpoint(ref_path, epoch=0, steps=2)
    out = str(tmp_path / "run")
    proc = run_cli([sys.executable, VIT_SCRIPT, *tiny_run_args(tiny_data[0], out, epochs=2, resume=str(ref_path),
                                                               max_steps_per_epoch=3)])
    assert re.search(r"resumed from .*reference-checkpoint-0.pth: epoch 1, step 0", proc.stdout), proc.output
    ckpt = last_checkpoint(out)
    saved = ref_optimizer.state_dict()
    assert ckpt["epoch"] == 1 and len(ckpt["optimizer"]["param_groups"]) == 2
    assert [len(g["params"]) for g in ckpt["optimizer"]["param_groups"]] == \
        [len(g["params"]) for g in saved["param_groups"]]
    # the moments went on from the reference's two steps: three more steps, not three from scratch
    assert {float(s["step"]) for s in ckpt["optimizer"]["state"].values()} == {2.0 + 3}
    # and the other grouping names its flag before any compute
    other = run_cli([sys.executable, VIT_SCRIPT, *tiny_run_args(tiny_data[0], str(tmp_path / "other"), epochs=2,
                                                                resume=str(ref_path), no_decay_tokens=True)],
                    expect_rc=1)
    assert "written with --decay_tokens" in other.stdout and "Traceback" not in other.stderr, other.output
