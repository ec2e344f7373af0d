"""The entry scripts as users run them: real subprocesses, real launchers, CPU + gloo. Checks that need no process
of their own (every flag check, --model list) run the same code in this process."""
import json
import math
import os
import re
import runpy
import sys

import pytest
import torch

import main_pretrain_multi_datasets_xray as vit_main
from tests.helpers import (
    CNN_SCRIPT,
    TOOLS,
    VIT_SCRIPT,
    child_env,
    nih_subset,
    picture,
    run_cli,
    tensorboard_scalars,
    tiny_run_args,
)
from util.host_memory import is_glibc

pytestmark = pytest.mark.slow


def _log_lines(out):
    with open(os.path.join(out, "log.txt"), encoding="utf-8") as f:
        return [json.loads(line) for line in f]


def _check_run_outputs(out, epochs=1):
    assert [r["epoch"] for r in _log_lines(out)] == list(range(epochs))
    ckpt = torch.load(os.path.join(out, "checkpoint-0.pth"), map_location="cpu", weights_only=True)
    assert {"model", "optimizer", "epoch", "scaler", "args"} <= set(ckpt)
    assert isinstance(ckpt["args"], dict)
    scalars = tensorboard_scalars(out)  # TensorBoard: a finite loss and an LR per step
    assert scalars["train_loss"] and len(scalars["lr"]) >= len(scalars["train_loss"])
    assert all(math.isfinite(v) for v in scalars["train_loss"])
    return ckpt


@pytest.mark.parametrize("script", [VIT_SCRIPT, CNN_SCRIPT])
def test_cli_single_process_epoch(tiny_data, tmp_path, script):
    data_path, counts = tiny_data
    model = "mae_vit_debug_patch16" if script == VIT_SCRIPT else "densenet121"
    proc = run_cli([sys.executable, script, *tiny_run_args(data_path, str(tmp_path), model=model)])
    _check_run_outputs(str(tmp_path))
    total = sum(counts.values())
    assert f"pre-training pool: {total} images" in proc.stdout
    assert '"eff_batch_size": 4' in proc.stdout and "actual lr" in proc.stdout
    assert ("freed memory stays in the process" in proc.stdout) == is_glibc()  # --keep_freed_memory, on by default
    picture(tmp_path / "reconstruction-0000.png", min_width=4 * 32, min_height=32)  # four panels of 32 px


def _resolved(stdout):
    return json.loads(re.search(r"resolved run: (\{.*\})", stdout).group(1))


@pytest.mark.parametrize("launcher", ["torchrun", "launch_use_env", "launch_local_rank_flag"])
def test_cli_two_processes(tiny_data, tmp_path, free_port, launcher):
    data_path, counts = tiny_data
    launch = {
        "torchrun": ["-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={free_port}"],
        "launch_use_env": ["-m", "torch.distributed.launch", "--nproc_per_node=2", "--use_env",
                           f"--master_port={free_port}"],
        # without --use_env the launcher appends --local-rank=N to the script's arguments
        "launch_local_rank_flag": ["-m", "torch.distributed.launch", "--nproc_per_node=2",
                                   f"--master_port={free_port}"],
    }[launcher]
    proc = run_cli([sys.executable, *launch, VIT_SCRIPT, *tiny_run_args(data_path, str(tmp_path))])
    resolved = _resolved(proc.stdout)
    per_rank = -(-sum(counts.values()) // 2)
    assert resolved["world_size"] == 2 and resolved["eff_batch_size"] == 8
    assert resolved["steps_per_epoch"] == per_rank // 4
    _check_run_outputs(str(tmp_path))
    assert sorted(os.listdir(tmp_path / "logs")) == ["rank0.log"]  # only rank 0 writes into output_dir


def test_cli_resume_continues_next_epoch(tiny_data, tmp_path):
    data_path, _ = tiny_data
    out = str(tmp_path)
    run_cli([sys.executable, VIT_SCRIPT, *tiny_run_args(data_path, out, epochs=1)])
    first = torch.load(os.path.join(out, "checkpoint-0.pth"), weights_only=True)
    # the state a kill leaves between the end-of-epoch checkpoint and its log.txt line: the resume restores the line
    open(os.path.join(out, "log.txt"), "w").close()
    proc = run_cli([sys.executable, VIT_SCRIPT, *tiny_run_args(data_path, out, epochs=2, no_auto_resume=True,
                                                               resume=os.path.join(out, "checkpoint-0.pth"))])
    assert "start at epoch 1 step 0" in proc.stdout
    assert "log.txt lacked epoch 0" in proc.stdout
    assert [r["epoch"] for r in _log_lines(out)] == [0, 1]
    last = torch.load(os.path.join(out, "checkpoint-1.pth"), weights_only=True)
    assert last["epoch"] == 1
    assert not torch.equal(first["model"]["blocks.0.attn.qkv.weight"], last["model"]["blocks.0.attn.qkv.weight"])


BAD_INPUT = [
    ({"mask_ratio": 1.0}, r"--mask_ratio is the fraction removed and must be in \[0, 1\), got 1.0"),
    ({"mask_ratio": 0.0}, r"--mask_ratio 0.0 removes none of the \d+ patches, and the loss is the mean over"),
    ({"model": "mae_vit_small_patch16_dec128d"}, "Did you mean: mae_vit_small_patch16_dec128d2b"),
    ({"input_size": 40}, "--input_size 40 must be divisible by the patch size 16"),
    ({"norm_stats": "bogus"}, "--norm_stats must be one of"),
    ({"batch_size": 0}, "--batch_size must be >= 1"),
    ({"mask_strategy": "heatmap"}, r"--mask_strategy 'heatmap': only 'random' is implemented"),
    ({"save_freq": -1, "keep_last": -2}, r"--save_freq must be >= 0, got -1(.|\n)*--keep_last must be >= 0, got -2"),
]


def test_cli_bad_input_gives_clear_error(tmp_path):
    """The process as a user meets it: exit code 1, the message, no traceback."""
    proc = run_cli([sys.executable, VIT_SCRIPT, *tiny_run_args("/nonexistent/data", str(tmp_path))], expect_rc=1)
    assert "chexpert: data folder /nonexistent/data/CheXpert-v1.0-small does not exist" in proc.stdout, proc.output
    assert "Traceback" not in proc.stdout + proc.stderr, proc.output


@pytest.mark.parametrize("overrides, message", BAD_INPUT)
def test_bad_flags_give_clear_errors(tiny_data, tmp_path, caplog, capsys, overrides, message):
    """Every flag check, through the entry script's parser and pipeline in this process (what the process adds, the
    exit code and no traceback, is the test above): a failed exit code and the message, before any compute."""
    try:
        code = vit_main.main(tiny_run_args(tiny_data[0], str(tmp_path), **overrides))
    except SystemExit as e:  # argparse's errors (code 2), and the flag checks' sys.exit(message)
        code = e.code
    text = caplog.text + "".join(capsys.readouterr()) + (code if isinstance(code, str) else "")
    assert code not in (0, None) and re.search(message, text), text
    assert not os.path.exists(tmp_path / "checkpoint-last.pth")


def test_cli_model_list_prints_names(monkeypatch, capsys):
    monkeypatch.setattr(sys, "argv", [VIT_SCRIPT, "--model", "list"])
    with pytest.raises(SystemExit) as stop:
        runpy.run_path(VIT_SCRIPT, run_name="__main__")
    assert stop.value.code == 0 and "mae_vit_base_patch16_dec512d8b" in capsys.readouterr().out.split()


@pytest.mark.parametrize("policy", ["error", "skip"])
def test_cli_bad_file_during_training(tmp_path, policy):
    from data.synthetic import make_nih, truncate_file

    make_nih(str(tmp_path / "data" / "nih_chestxray"))
    victim = tmp_path / "data" / "nih_chestxray" / "images" / open(nih_subset(str(tmp_path / "data"))).read().split()[3]
    truncate_file(str(victim), keep=0.5)
    args = tiny_run_args(str(tmp_path / "data"), str(tmp_path / "out"), epochs=2, bad_files=policy, startup_check=0)
    args = args[: args.index("--datasets_names")] + ["--datasets_names", "chestxray_nih"]
    proc = run_cli([sys.executable, VIT_SCRIPT, *args], expect_rc=None)
    assert victim.name in proc.stdout, proc.output
    if policy == "error":
        assert proc.returncode == 1 and "--bad_files skip" in proc.stdout and "Traceback" not in proc.stderr
    else:
        assert proc.returncode == 0, proc.output
        assert [r["train_replaced_files"] for r in _log_lines(str(tmp_path / "out"))] == [1, 2]


@pytest.mark.slow
def test_cli_compile_under_ddp_keeps_ranks_in_sync(tiny_data, tmp_path, free_port):
    """torchrun, 2 processes, gloo, --compile (inductor on CPU): DDP's bucketed all-reduce runs inside the compiled
    graph, so at every checkpoint both ranks hold the same weights (the engine compares their checksums and logs an
    error if not), and the checkpoint keys carry no _orig_mod. prefix."""
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={free_port}"]
    proc = run_cli([*torchrun, VIT_SCRIPT, *tiny_run_args(tiny_data[0], str(tmp_path), epochs=2, compile=True,
                                                          save_every_steps=2)], timeout=600)
    assert "hold different weights" not in proc.stdout + proc.stderr, proc.output
    # the comparison ran at every checkpoint: two mid-epoch (--save_every_steps 2) and one per epoch
    same = re.findall(r"all 2 ranks hold the same weights at epoch (\d) step (\d)", proc.stdout)
    assert {("0", "0"), ("1", "0")} <= set(same) and any(step != "0" for _, step in same), proc.output
    ckpt = _check_run_outputs(str(tmp_path), epochs=2)
    assert ckpt["world_size"] == 2 and not any(k.startswith("_orig_mod.") for k in ckpt["model"])




def test_tools_run_as_modules_from_the_repository_root():
    """As PRETRAIN.md says to run them: `python -m tools.<name>` from the root, no PYTHONPATH, no sys.path edits.
    One interpreter runs each tool's --help the way -m does (runpy.run_module, the working directory first on
    sys.path), so the imports are paid once rather than once per tool."""
    env = {k: v for k, v in child_env().items() if k != "PYTHONPATH"}
    code = ("import runpy, sys\n"
            "for tool in sys.argv[1:]:\n"
            "    sys.argv = [tool, '--help']\n"
            "    try:\n"
            "        runpy.run_module(f'tools.{tool}', run_name='__main__', alter_sys=True)\n"
            "    except SystemExit as e:\n"
            "        print(f'== {tool} exited {e.code}')\n")
    proc = run_cli([sys.executable, "-c", code, *TOOLS], env=env)
    assert [line for line in proc.stdout.splitlines() if line.startswith("== ")] == [
        f"== {tool} exited 0" for tool in TOOLS], proc.output
    assert proc.stdout.count("usage:") == len(TOOLS) and len(TOOLS) >= 10, proc.output


def test_a_resume_of_another_tasks_checkpoint_names_init_from(tiny_data, tmp_path, caplog):
    """--resume from elsewhere continues a run of this script; a fine-tuning checkpoint's weights go in --init_from."""
    torch.save({"model": {}, "epoch": 0, "task": "finetune", "args": {"model": "vit_debug_patch16"}},
               tmp_path / "finetuned.pth")
    out = tmp_path / "out"
    code = vit_main.main(tiny_run_args(tiny_data[0], str(out), resume=str(tmp_path / "finetuned.pth")))
    assert code == 1
    assert ("finetuned.pth is a checkpoint of finetune, and this script runs pre-training; --resume continues a run "
            "of this script; to start from its weights, pass it as --init_from") in caplog.text, caplog.text
    assert not (out / "checkpoint-last.pth").exists()
