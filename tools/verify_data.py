"""Check every image the pre-training pool would use: missing files, unreadable or truncated images,
CSVs without the expected columns, leakage into held-out splits. Exit code 1 if anything is wrong.

    python -m tools.verify_data --data_path data --datasets_names chexpert chestxray_nih mimic_cxr [--workers 8]
    python -m tools.verify_data --dataset chestxray --data_path data/nih_chestxray [--train_list ... --val_list ...]

Takes the data flags of the training scripts that say what the sources are and where; with --dataset, a fine-tuning
dataset's three lists instead (their labels, duplicates and patients are checked as fine-tuning checks them).
"""
import argparse
import datetime
import multiprocessing
import os
import sys
import time

import data
from data import labelled
from data.image_io import decode_problem
from tools.reporting import run_tool
from util.log import write_json


def _check(path: str):
    return path, decode_problem(path)


def check_all(paths: list[str], workers: int) -> list[tuple[str, str]]:
    problems, start = [], time.time()
    with multiprocessing.get_context("spawn").Pool(workers) as pool:
        for done, (path, why) in enumerate(pool.imap_unordered(_check, paths, chunksize=64), start=1):
            if why:
                problems.append((path, why))
            if done % 2000 == 0 or done == len(paths):
                rate = done / max(time.time() - start, 1e-9)
                eta = datetime.timedelta(seconds=int((len(paths) - done) / rate))
                print(f"  {done}/{len(paths)} checked, {len(problems)} bad, {rate:.0f} img/s, eta {eta}", flush=True)
    return sorted(problems)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    data.add_data_args(parser, training=False)
    parser.add_argument("--dataset", default=None, choices=[d for d in labelled.DATASETS if d != "csv"],
                        help="check a fine-tuning dataset instead of the pre-training pool: the lists (labels, "
                             "duplicates, shared patients) and every image of --train_list, --val_list and "
                             "--test_list, with main_finetune_chestxray.py's defaults (default: the pool)")
    parser.add_argument("--val_list", default=None,
                        help="with --dataset: the validation list (default: as fine-tuning)")
    parser.add_argument("--test_list", default=None, help="with --dataset: the test list (default: as fine-tuning)")
    parser.add_argument("--workers", type=int, default=os.cpu_count(), help="decoding processes (default: all cores)")
    parser.add_argument("--report", default=None, help="also write the findings to this JSON file")
    args = parser.parse_args()
    problems = data.check_data_args(args)
    if problems:
        parser.error("; ".join(problems))
    return run_tool(lambda: verify(args))


def image_sets(args) -> dict[str, tuple[str, list[str]]]:
    """name -> (where, image paths) of what to check: the pool's sources, or a fine-tuning dataset's three lists."""
    if args.dataset is None:
        return {idx.name: (idx.root, sorted({p.decode() for p in idx.paths}))
                for idx in data.build_indexes(args, check_files=False)}
    finetune_data = argparse.ArgumentParser(add_help=False)
    labelled.add_data_args(finetune_data)  # fine-tuning's own defaults, so a new data flag is never missing here
    lists = finetune_data.parse_args([])
    for flag in ("dataset", "data_path", "train_list", "val_list", "test_list"):
        setattr(lists, flag, getattr(args, flag))
    lists.check_images = "none"  # every file is decoded below, with a report
    return {f"{args.dataset} {role}": (split.source, sorted({p.decode() for p in split.paths}))
            for role, split in labelled.build_splits(lists).items()}


def verify(args) -> int:
    report = {}
    for name, (where, paths) in image_sets(args).items():
        print(f"{name}: checking {len(paths)} images of {where}")
        report[name] = [{"path": p, "problem": why} for p, why in check_all(paths, max(args.workers, 1))]
        for item in report[name]:
            print(f"  BAD {item['path']}: {item['problem']}")
    if args.report:
        write_json(args.report, report)
    bad = sum(len(v) for v in report.values())
    with_bad = sum(1 for v in report.values() if v)
    print(f"{'OK' if not bad else 'FAILED'}: {bad} bad file(s) in {with_bad} of {len(report)} "
          f"{'list(s)' if args.dataset else 'source(s)'}")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
