"""Check every image the pre-training pool would use: missing files, unreadable or truncated images,
CSVs without the expected columns, leakage into held-out splits. Exit code 1 if anything is wrong.

    python -m tools.verify_data --data_path data --datasets_names chexpert chestxray_nih mimic_cxr [--workers 8]

Takes the same data flags as the training scripts.
"""
import argparse
import datetime
import json
import multiprocessing
import os
import sys
import time

import data
from data.image_io import decode_problem


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
    parser.add_argument("--workers", type=int, default=os.cpu_count(), help="decoding processes (default: all cores)")
    parser.add_argument("--report", default=None, help="also write the findings to this JSON file")
    args = parser.parse_args()
    problems = data.check_data_args(args)
    if problems:
        parser.error("; ".join(problems))
    report = {}
    try:
        indexes = data.build_indexes(args, check_files=False)
    except (OSError, ValueError, RuntimeError) as e:
        print(f"error: {e}")
        return 1
    for idx in indexes:
        paths = sorted({p.decode() for p in idx.paths})
        print(f"{idx.name}: checking {len(paths)} images under {idx.root}")
        report[idx.name] = [{"path": p, "problem": why} for p, why in check_all(paths, max(args.workers, 1))]
        for item in report[idx.name]:
            print(f"  BAD {item['path']}: {item['problem']}")
    if args.report:
        with open(args.report, "w", encoding="utf-8") as f:
            json.dump(report, f, indent=2)
    bad = sum(len(v) for v in report.values())
    sources_with_bad = sum(1 for v in report.values() if v)
    print(f"{'OK' if not bad else 'FAILED'}: {bad} bad file(s) in {sources_with_bad} of {len(report)} source(s)")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
