"""tools/sweep.py and tools/collect_results.py: a real sweep of tiny fine-tuning runs (checkpoint x fraction x seed),
resumed, then one table with every run accounted for."""
import json
import os
import re

import pandas as pd
import pytest

from data.synthetic import make_nih_labelled
from tests.helpers import picture, run_tool, run_tool_in_process

pytestmark = pytest.mark.slow  # four fine-tuning processes


@pytest.fixture(scope="module")
def swept(runs, tmp_path_factory):
    root = tmp_path_factory.mktemp("sweep")
    lists = make_nih_labelled(str(root / "nih"), patients=(8, 3, 3), size=(32, 32))
    flags = ["--model", "vit_debug_patch16", "--data_path", str(root / "nih"), "--train_list", lists["train"],
             "--val_list", lists["val"], "--test_list", lists["test"], "--input_size", "32", "--batch_size", "4",
             "--epochs", "1", "--warmup_epochs", "0", "--num_workers", "0", "--device", "cpu", "--bootstrap", "0"]
    sweep = ["--out", str(root / "sweep"), "--checkpoints", runs["vit"], "none", "--fractions", "0.5",
             "--seeds", "0", "1", "--", *flags]
    first = run_tool("sweep.py", *sweep, timeout=900)
    return root, sweep, first


def test_the_sweep_runs_every_combination_in_its_own_folder_and_resumes(swept):
    root, sweep, first = swept
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-3000:]
    folders = sorted(os.path.relpath(os.path.dirname(p), root / "sweep")
                     for p in map(str, (root / "sweep").rglob("results.json")))
    assert len(folders) == 4 and "random_init/frac_0.5/seed_1" in folders
    args = json.loads((root / "sweep" / "random_init" / "frac_0.5" / "seed_1" / "args.json").read_text())
    assert (args["label_fraction"], args["seed"], args["fraction_seed"]) == (0.5, 1, 1) and not args["finetune"]
    listed = run_tool_in_process("sweep.py", *sweep[:sweep.index("--")], "--list", "--", *sweep[sweep.index("--") + 1:])
    assert "4 runs (SLURM: --array=0-3)" in listed.stdout
    again = run_tool("sweep.py", *sweep, timeout=300)
    assert again.returncode == 0 and again.stdout.count("finished, skipped") == 4, again.stdout


def test_collect_results_tables_every_run_and_lists_the_unfinished(swept, tmp_path):
    root = swept[0]
    unfinished = root / "sweep" / "random_init" / "frac_0.5" / "seed_0"
    (unfinished / "results.json").rename(unfinished / "results.json.away")
    try:
        proc = run_tool_in_process("collect_results.py", str(root / "sweep"), "--out", str(tmp_path / "t"),
                                   "--resamples", "20")
    finally:
        (unfinished / "results.json.away").rename(unfinished / "results.json")
    assert proc.returncode == 0, proc.stderr
    table = pd.read_csv(tmp_path / "t" / "results.csv")
    assert len(table) == 2 and sorted(table["seeds"]) == [1, 2]
    one = table[table["checkpoint"] == "random init"].iloc[0]
    kept = json.loads((root / "sweep" / "random_init" / "frac_0.5" / "seed_1" / "results.json").read_text())
    assert one["seeds"] == 1 and one["mean"] == pytest.approx(kept["test"]["mean_auroc"])
    assert f"Not finished (no results.json), left out of the table: {unfinished}" in proc.stdout
    tex = (tmp_path / "t" / "results.tex").read_text()
    assert "\\toprule" in tex and "\\bottomrule" in tex
    assert re.search(r"vit\\_checkpoint-0 & 50\\% & 2 & 0\.\d{3} \$\\pm\$", tex), tex
    picture(tmp_path / "t" / "score_vs_fraction.png", min_width=200)


def test_sweep_flags_it_sets_itself_are_refused(tmp_path):
    proc = run_tool_in_process("sweep.py", "--out", str(tmp_path), "--checkpoints", "none", "--", "--seed", "3")
    assert proc.returncode == 2 and "--seed is set by the sweep for each run" in proc.stderr


def test_the_array_script_runs_its_task_of_the_sweep(swept, tmp_path):
    """scripts/finetune_sweep.sbatch as SLURM runs it for array task 3: that run only (finished here, so skipped)."""
    import subprocess

    from tests.helpers import ROOT, child_env

    root, sweep, _ = swept
    split = sweep.index("--")
    env = child_env(SWEEP=" ".join(sweep[:split]), FINETUNE_FLAGS=" ".join(sweep[split + 1:]),
                    SLURM_ARRAY_TASK_ID="3")
    proc = subprocess.run(["bash", str(ROOT / "scripts" / "finetune_sweep.sbatch")], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert re.fullmatch(r"run 3 \(\S+/seed_1\): finished, skipped\n", proc.stdout), proc.stdout
