"""Helpers the tests share: the repository root, the entry scripts, a child environment, a CLI runner, tiny-run flags.

Fixtures live in conftest.py; these are plain functions, imported as `from tests.helpers import ...`.
"""
import argparse
import contextlib
import importlib
import io
import json
import logging
import math
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

import data
import engine
import main_pretrain_multi_datasets_xray as vit_main
import models_mae
from data.synthetic import NIH_SUBSET_LIST
from engine_pretrain import PretrainTask

ROOT = Path(__file__).resolve().parents[1]
VIT_SCRIPT = str(ROOT / "main_pretrain_multi_datasets_xray.py")
CNN_SCRIPT = str(ROOT / "main_pretrain_multi_datasets_xray_cnn.py")


TOOL_HELPERS = ("__init__", "checkpoint_model", "reporting")  # modules the tools share, not tools themselves
TOOLS = sorted(p.stem for p in (ROOT / "tools").glob("*.py") if p.stem not in TOOL_HELPERS)


def child_env(**extra) -> dict:
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_", "SLURM_", "OMPI_"))}
    env.update(OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT), PYTHONUNBUFFERED="1")
    env.update({k: str(v) for k, v in extra.items()})
    return env


def run_cli(cmd: list[str], cwd=None, timeout: int = 300, env=None, expect_rc: int | None = 0):
    """Run a command; on an unexpected exit code fail with its stdout and stderr."""
    proc = subprocess.run(cmd, cwd=cwd or ROOT, env=env or child_env(), capture_output=True, text=True,
                          timeout=timeout)
    output = f"$ {' '.join(cmd)}\n--- stdout ---\n{proc.stdout[-6000:]}\n--- stderr ---\n{proc.stderr[-6000:]}"
    if expect_rc is not None:
        assert proc.returncode == expect_rc, f"exit code {proc.returncode}, expected {expect_rc}\n{output}"
    proc.output = output
    return proc


def nih_subset(data_path: str) -> str:
    """The fixture's few NIH training images hold only part of the default train_official.txt: their own list."""
    return os.path.join(data_path, "nih_chestxray", NIH_SUBSET_LIST)


def tiny_run_args(data_path: str, out: str, model: str = "mae_vit_debug_patch16", **overrides) -> list[str]:
    """Flags for a seconds-long CPU run on the tiny fixture."""
    flags = {"model": model, "input_size": 32, "batch_size": 4, "epochs": 1, "warmup_epochs": 0, "mask_ratio": 0.75,
             "num_workers": 0, "device": "cpu", "data_path": data_path, "output_dir": out, "log_dir": out,
             "blr": 1.5e-4, "print_freq": 1, "train_list": nih_subset(data_path)}
    flags.update(overrides)
    return argv(flags) + ["--datasets_names", "chexpert", "chestxray_nih", "mimic_cxr"]


def argv(flags: dict) -> list[str]:
    """{flag: value} as command-line words: True is the bare flag, None and False leave it out, a list or tuple
    gives several values."""
    args = []
    for key, value in flags.items():
        if value is True:
            args.append(f"--{key}")
        elif isinstance(value, (list, tuple)):
            args += [f"--{key}", *map(str, value)]
        elif value is not None and value is not False:
            args += [f"--{key}", str(value)]
    return args


def build_dataset(names, data_path, **overrides):
    """build_pretrain_dataset on a fixture: 32 px, and the fixture's own NIH list unless one is given."""
    overrides.setdefault("input_size", 32)
    overrides.setdefault("train_list", nih_subset(data_path))
    return data.build_pretrain_dataset(names, data_path=data_path, **overrides)


def default_data_args() -> argparse.Namespace:
    """Every data flag at its default."""
    parser = argparse.ArgumentParser()
    data.add_data_args(parser)
    return parser.parse_args([])


def run_tool(tool: str, *args, timeout: int = 300) -> subprocess.CompletedProcess:
    """python -m tools.<tool> from the repository root, as PRETRAIN.md runs it."""
    return subprocess.run([sys.executable, "-m", f"tools.{tool.removesuffix('.py')}", *args], cwd=ROOT,
                          env=child_env(), capture_output=True, text=True, timeout=timeout)


def run_tool_in_process(tool: str, *args) -> subprocess.CompletedProcess:
    """tools.<tool>'s main() in this process, as `python -m tools.<tool>` runs it: the exit code, and what it printed
    and logged. For tests of what a tool does; test_cli runs every tool as a module, so the process boundary is
    tested once, not paid for (about 7 s of imports here) in every call. An uncaught error is exit code 1 with its
    message on stderr, as the interpreter would report it."""
    module = importlib.import_module(f"tools.{tool.removesuffix('.py')}")
    out, err = io.StringIO(), io.StringIO()
    root, handler, level = logging.getLogger(), logging.StreamHandler(out), logging.getLogger().level
    argv, sys.argv = sys.argv, [f"tools/{tool}", *args]
    root.addHandler(handler)
    root.setLevel(logging.INFO)
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            try:
                code = module.main()
            except SystemExit as e:
                code = e.code
                if isinstance(code, str):
                    err.write(code + "\n")
                    code = 1
            except Exception as e:  # noqa: BLE001 - reported as the interpreter would, for the test to assert on
                err.write(f"{type(e).__name__}: {e}\n")
                code = 1
    finally:
        sys.argv = argv
        root.removeHandler(handler)
        root.setLevel(level)
    return subprocess.CompletedProcess([tool, *args], code or 0, out.getvalue(), err.getvalue())


def train_in_process(script, data_path: str, out: str, **overrides) -> str:
    """A tiny run of an entry script's pipeline in this process; returns its checkpoint-0.pth."""
    assert script.main(tiny_run_args(data_path, out, **overrides)) == 0
    return os.path.join(out, "checkpoint-0.pth")


def spawn(cmd: list[str], env=None) -> subprocess.Popen:
    """Start a command in the background, stdout and stderr merged, for tests that signal it mid-run."""
    return subprocess.Popen(cmd, cwd=ROOT, env=env or child_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True)


def wait_for_line(proc: subprocess.Popen, pattern: str, timeout: float = 120) -> str:
    """Read proc's output until a line matches; returns what was read. Kills proc and fails if it never comes."""
    deadline, seen = time.time() + timeout, []
    while time.time() < deadline:
        line = proc.stdout.readline()
        if not line and proc.poll() is not None:
            break
        seen.append(line)
        if re.search(pattern, line):
            return "".join(seen)
    proc.kill()
    raise AssertionError(f"pattern {pattern!r} never appeared:\n{''.join(seen)[-4000:]}")


def last_checkpoint(out: str) -> dict:
    return torch.load(os.path.join(out, "checkpoint-last.pth"), map_location="cpu", weights_only=True)


def training_checkpoint(path: str, epoch: int, world_size: int) -> dict:
    """A training checkpoint that loads, of the given epoch and world size, with every rank's RNG and finite weights."""
    ckpt = torch.load(path, map_location="cpu", weights_only=True)
    assert ckpt["epoch"] == epoch and ckpt["world_size"] == world_size and len(ckpt["rng"]) == world_size, path
    assert all(v.isfinite().all() for v in ckpt["model"].values() if v.is_floating_point()), path
    return ckpt


def tensorboard_scalars(folder) -> dict[str, list[float]]:
    """Every scalar series TensorBoard would show from the event files in `folder`."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(folder))
    events.Reload()
    return {tag: [e.value for e in events.Scalars(tag)] for tag in events.Tags()["scalars"]}


def picture(path, min_width: int = 1, min_height: int = 1) -> np.ndarray:
    """The gray pixels of a PNG that decodes, at least this large, and not blank (its pixels vary)."""
    with Image.open(path) as image:
        pixels = np.asarray(image.convert("L"), dtype=np.float32)
    assert pixels.shape[1] >= min_width and pixels.shape[0] >= min_height, (path, pixels.shape)
    assert pixels.std() > 1.0, f"{path} is blank"
    return pixels


def in_process_args(script, data_path: str, out: str, **flags) -> argparse.Namespace:
    return argparse.ArgumentParser(parents=[script.get_args_parser()]).parse_args(tiny_run_args(data_path, out,
                                                                                                **flags))


# ---- models that misbehave on chosen steps (non-finite losses and gradients), for the engine's guard ----

class NaNInjectingMAE(models_mae.MaskedAutoencoderViT):
    """A real debug-size MAE whose loss becomes NaN on chosen forward calls (1-based)."""

    def __init__(self, bad_calls, **kwargs):
        super().__init__(embed_dim=64, depth=2, num_heads=4, decoder_embed_dim=32, decoder_depth=1,
                         decoder_num_heads=4, mlp_ratio=2, **kwargs)
        self.bad_calls, self.calls, self.snapshots = set(bad_calls), 0, []

    def forward(self, imgs, mask_ratio=None):
        self.calls += 1
        self.snapshots.append(self.blocks[0].attn.qkv.weight.detach().clone())
        loss, pred, mask = super().forward(imgs, mask_ratio)
        return (loss * float("nan") if self.calls in self.bad_calls else loss), pred, mask


class InfGradMAE(NaNInjectingMAE):
    """The same debug MAE with a finite loss whose gradient overflows (inf in one weight) on chosen calls."""

    def forward(self, imgs, mask_ratio=None):
        self.calls += 1
        self.snapshots.append(self.blocks[0].attn.qkv.weight.detach().clone())
        if self.calls in self.bad_calls:
            weight = self.blocks[0].attn.qkv.weight

            def overflow(grad):  # this backward only
                handle.remove()
                return grad * float("inf")

            handle = weight.register_hook(overflow)
        return models_mae.MaskedAutoencoderViT.forward(self, imgs, mask_ratio)


def check_fp16_overflow_is_a_scaler_skip(data_path: str, tmp_path, device: str) -> None:
    """An overflowing gradient leaves the weights and the optimizer state alone, counts one scaler skip (not a bad
    step, not an optimizer step), halves the scale, and keeps inf out of the logged gradient norm."""
    args = in_process_args(vit_main, data_path, str(tmp_path), precision="fp16", device=device)
    model = InfGradMAE({3}, img_size=args.input_size)
    assert engine.run(PretrainTask(lambda a: model), args) == 0
    assert torch.equal(model.snapshots[2], model.snapshots[3]) and not torch.equal(model.snapshots[3],
                                                                                    model.snapshots[4])
    ckpt = last_checkpoint(str(tmp_path))
    steps = model.calls - 1  # training steps: the last forward is the end-of-run reconstruction monitor
    assert ckpt["optimizer_steps"] == steps - 1 and ckpt["scaler_skips_total"] == 1 and ckpt["bad_steps_total"] == 0
    assert {int(s["step"]) for s in ckpt["optimizer"]["state"].values()} == {steps - 1}  # AdamW did not step
    assert ckpt["scaler"]["scale"] == 2.0**15  # 2^16 at start, halved once
    line = json.loads((tmp_path / "log.txt").read_text().splitlines()[-1])
    assert line["train_scaler_skips"] == 1 and line["train_bad_steps"] == 0 and line["train_loss_scale"] == 2.0**15
    assert math.isfinite(line["train_grad_norm"]) and math.isfinite(line["train_loss"])


def run_main(main, argv: list[str], caplog) -> tuple[int, str]:
    """(exit code, log text) of an entry script's main(argv) in this process; the flag checks' sys.exit(message) is
    exit code 1 with its message appended, argparse's exit 2 stays 2."""
    caplog.clear()
    try:
        code = main(argv)
    except SystemExit as e:
        code = e.code
    text = caplog.text + (code if isinstance(code, str) else "")
    return (1 if isinstance(code, str) else code), text
