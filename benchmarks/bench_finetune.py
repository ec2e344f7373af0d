"""Fine-tuning at the users' scale: what the start-up checks and the end-of-run bootstrap cost with the real list
sizes, on this machine's CPU.

    python -m benchmarks.bench_finetune --work /tmp/full_size [--resamples 100]

On benchmarks/full_size_data.py's tree (NIH: every image of the official lists as hard links; CheXpert: 223,414
train.csv rows) it times, in one process:
  - NIH splits: the three official lists (75,312 / 11,212 / 25,596) read, every file checked, patients compared;
  - CheXpert splits: train.csv less 5% of its patients (validation), valid.csv;
  - a 1% label-fraction draw by patient, written as a list;
  - the pickle rank 0 sends to the other ranks (its size);
  - the patient bootstrap of the test AUROC: --resamples resamples of 25,596 x 14 synthetic scores grouped by NIH's
    test patients, and the cost of 1000 (the default) from it.
"""
import argparse
import os
import pickle
import time

import numpy as np

import main_finetune_chestxray as ft_main
from benchmarks.full_size_data import make_full_size
from data import labelled
from util.metrics import bootstrap_auroc


def timed(fn):
    start = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work", required=True, help="folder for the full-size tree (reused when present)")
    parser.add_argument("--resamples", type=int, default=100, help="bootstrap resamples to time (default: 100)")
    args = parser.parse_args()
    make_full_size(args.work)
    out = os.path.join(args.work, "bench_finetune")
    os.makedirs(out, exist_ok=True)

    def parse(flags):
        return ft_main.get_args_parser().parse_args([*flags, "--output_dir", out])

    nih_args = parse(["--data_path", os.path.join(args.work, "nih_chestxray")])
    nih, nih_s = timed(lambda: labelled.build_splits(nih_args))
    chexpert_args = parse(["--dataset", "chexpert", "--nb_classes", "5", "--data_path", args.work])
    chexpert, chexpert_s = timed(lambda: labelled.build_splits(chexpert_args))
    _, draw_s = timed(lambda: labelled.label_fraction(nih["train"], 0.01, 0, out))
    payload = len(pickle.dumps(nih))
    test = labelled.load_labels(nih_args, nih["test"])
    rng = np.random.default_rng(0)
    scores = rng.random(test.labels.shape) + 0.5 * test.labels
    _, boot_s = timed(lambda: bootstrap_auroc(scores, test.labels, test.patients, args.resamples))
    rows = [
        ("NIH official splits built and checked", sum(len(s) for s in nih.values()), nih_s),
        ("CheXpert splits built and checked", sum(len(s) for s in chexpert.values()), chexpert_s),
        ("1% label fraction drawn and written", len(nih["train"]), draw_s),
        (f"bootstrap, {args.resamples} patient resamples", len(test), boot_s),
    ]
    print(f"{'step':<42} {'images':>8} {'seconds':>8}")
    for name, images, seconds in rows:
        print(f"{name:<42} {images:>8,} {seconds:>8.2f}")
    print(f"pickled NIH splits sent to the other ranks: {payload / 2**20:.1f} MiB")
    print(f"bootstrap of 1000 resamples (the default), from this run: {boot_s * 1000 / args.resamples:.0f} s; "
          f"{boot_s * 1000 / args.resamples / nih_s:.0f}x the NIH start-up checks")


if __name__ == "__main__":
    main()
