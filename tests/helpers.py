"""Helpers the tests share: the repository root, the entry scripts, a child environment, a CLI runner, tiny-run flags.

Fixtures live in conftest.py; these are plain functions, imported as `from tests.helpers import ...`.
"""
import argparse
import contextlib
import importlib
import io
import logging
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import torch

import data
from data.synthetic import NIH_SUBSET_LIST

ROOT = Path(__file__).resolve().parents[1]
VIT_SCRIPT = str(ROOT / "main_pretrain_multi_datasets_xray.py")
CNN_SCRIPT = str(ROOT / "main_pretrain_multi_datasets_xray_cnn.py")


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
    args = []
    for key, value in flags.items():
        if value is True:
            args.append(f"--{key}")
        elif isinstance(value, (list, tuple)):
            args += [f"--{key}", *map(str, value)]
        elif value is not None and value is not False:
            args += [f"--{key}", str(value)]
    return args + ["--datasets_names", "chexpert", "chestxray_nih", "mimic_cxr"]


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
