"""Run one fine-tuning recipe over checkpoints x label fractions x seeds, each run in its own folder.

    python -m tools.sweep --out runs/sweep --checkpoints runs/vit_s/checkpoint-799.pth exports/imagenet.pth none \
        --fractions 0.01 0.1 1 --seeds 0 1 2 -- --model vit_small_patch16 --data_path data/nih_chestxray ...

Everything after `--` is passed to main_finetune_chestxray.py unchanged (add --linear_probe for the probe script);
the sweep adds --finetune (`none`: random initialisation), --label_fraction, --fraction_seed and --seed (both the
run's seed) and --output_dir/--log_dir OUT/<checkpoint>/frac_<f>/seed_<s>. The label fraction is drawn by patient,
as a single run draws it, with the seed as --fraction_seed, so seed s draws the same patients for every checkpoint.

Resumable: a finished run (results.json written) is skipped, an interrupted one resumes from its own folder. On
SLURM, one array task per run: `sbatch --array=0-N ... python -m tools.sweep ... --task $SLURM_ARRAY_TASK_ID` runs
run number TASK only (--list prints the numbered runs and N). Then: python -m tools.collect_results OUT.
"""
import argparse
import itertools
import os
import re
import subprocess
import sys

from tools.reporting import run_tool
from util.errors import SetupError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    passed = argv[argv.index("--") + 1:] if "--" in argv else []
    own = argv[:argv.index("--")] if "--" in argv else argv
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True, help="folder of the sweep; one sub-folder per run")
    parser.add_argument("--checkpoints", nargs="+", required=True,
                        help="pre-trained weights to fine-tune (--finetune), or 'none' for random initialisation")
    parser.add_argument("--fractions", nargs="+", type=float, default=[1.0], help="label fractions (default: 1)")
    parser.add_argument("--seeds", nargs="+", type=int, default=[0], help="seeds (default: 0)")
    parser.add_argument("--linear_probe", action="store_true", help="run main_linprobe_chestxray.py instead "
                        "(default: off, fine-tuning)")
    parser.add_argument("--task", type=int, default=None, help="run only run number TASK (a SLURM array index; "
                        "default: every run, one after another)")
    parser.add_argument("--list", action="store_true", help="print the numbered runs and their commands, run nothing")
    args = parser.parse_args(own)
    for flag in ("--finetune", "--label_fraction", "--fraction_seed", "--seed", "--output_dir", "--log_dir"):
        if flag in passed:
            parser.error(f"{flag} is set by the sweep for each run; remove it from the flags after --")
    bad = [f for f in args.fractions if not 0 < f <= 1]
    if bad:
        parser.error(f"--fractions are shares of the training list in (0, 1], got {bad}")
    return run_tool(lambda: sweep(args, passed))


def run_name(checkpoint: str) -> str:
    """A folder name for a checkpoint: the file's stem with its parent folder (runs/vit_s/checkpoint-799.pth ->
    vit_s_checkpoint-799), or 'random_init'."""
    if checkpoint == "none":
        return "random_init"
    parent = os.path.basename(os.path.dirname(os.path.abspath(checkpoint)))
    stem = os.path.splitext(os.path.basename(checkpoint))[0]
    return re.sub(r"[^\w.-]", "_", f"{parent}_{stem}" if parent else stem)


def planned(args, passed: list[str]) -> list[tuple[str, list[str]]]:
    script = os.path.join(ROOT, "main_linprobe_chestxray.py" if args.linear_probe else "main_finetune_chestxray.py")
    names = [run_name(c) for c in args.checkpoints]
    if len(set(names)) < len(names):
        raise SetupError(f"--checkpoints give the same folder name twice ({names}); copy or link one under another "
                         "folder name")
    runs = []
    for (checkpoint, name), fraction, seed in itertools.product(zip(args.checkpoints, names), args.fractions,
                                                                  args.seeds):
        folder = os.path.join(args.out, name, f"frac_{fraction:g}", f"seed_{seed}")
        init = [] if checkpoint == "none" else ["--finetune", checkpoint]
        runs.append((folder, [sys.executable, script, *passed, *init, "--label_fraction", f"{fraction:g}",
                              "--fraction_seed", str(seed), "--seed", str(seed), "--output_dir", folder,
                              "--log_dir", folder]))
    return runs


def sweep(args, passed: list[str]) -> int:
    missing = [c for c in args.checkpoints if c != "none" and not os.path.isfile(c)]
    if missing:
        raise SetupError(f"--checkpoints: {', '.join(missing)} not found")
    runs = planned(args, passed)
    if args.list:
        for k, (folder, command) in enumerate(runs):
            print(f"{k}: {folder}\n   {' '.join(command)}")
        print(f"{len(runs)} runs (SLURM: --array=0-{len(runs) - 1})")
        return 0
    if args.task is not None:
        if not 0 <= args.task < len(runs):
            raise SetupError(f"--task {args.task}: the sweep has runs 0 to {len(runs) - 1}")
        folder, command = runs[args.task]
        if os.path.isfile(os.path.join(folder, "results.json")):
            print(f"run {args.task} ({folder}): finished, skipped")
            return 0
        print(f"run {args.task}: {folder}", flush=True)
        os.execv(command[0], command)  # the run replaces this process: SLURM's signals reach training itself
    failed = []
    for k, (folder, command) in enumerate(runs, start=1):
        if os.path.isfile(os.path.join(folder, "results.json")):
            print(f"[{k}/{len(runs)}] {folder}: finished, skipped")
            continue
        print(f"[{k}/{len(runs)}] {folder}", flush=True)
        if subprocess.run(command).returncode != 0:
            failed.append(folder)
    if failed:
        print(f"{len(failed)} run(s) failed: {', '.join(failed)}; rerun the sweep to retry them (finished runs are "
              "skipped)", file=sys.stderr)
        return 1
    print(f"done: {len(runs)} run(s) under {args.out}; python -m tools.collect_results {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
