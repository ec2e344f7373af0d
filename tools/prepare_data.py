"""Decode, convert to 8-bit gray and resize every pre-training image once, into a few memory-mapped shards.

    python -m tools.prepare_data --data_path data --datasets_names chexpert chestxray_nih mimic_cxr \
        --out data/prepared_320 --prepare_size 320 --workers 16
    python main_pretrain_multi_datasets_xray.py ... --prepared_dir data/prepared_320

Takes the same data flags as the training scripts (filters run before preparation). Progress is printed with
an ETA; rerunning the same command after an interruption resumes at the first unfinished shard.
"""
import argparse
import logging
import os
import sys

import data
from data.prepared import PreparedStore, prepare
from tools.reporting import run_tool


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    data.add_data_args(parser, training=False)
    parser.add_argument("--out", required=True, help="folder to write (resumes if it holds a partial preparation)")
    parser.add_argument("--prepare_size", type=int, default=320,
                        help="shorter side after resizing, as the reference's resized MIMIC copy (default: 320)")
    parser.add_argument("--workers", type=int, default=os.cpu_count(), help="decoding processes (default: all cores)")
    parser.add_argument("--shard_images", type=int, default=8192, help="images per shard file (default: 8192)")
    parser.add_argument("--verify", action="store_true",
                        help="only check every shard of --out against the checksums in its manifest, then exit")
    args = parser.parse_args()
    if args.verify:
        if not os.path.isfile(os.path.join(args.out, "manifest.json")):
            print(f"error: --out {args.out} holds no preparation (no manifest.json) to verify", file=sys.stderr)
            return 1
        bad = PreparedStore(args.out).verify()
        print("all shards match the manifest" if not bad else f"checksum mismatch: {', '.join(bad)}")
        return 1 if bad else 0
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    problems = data.check_data_args(args)
    if args.prepare_size < 16:
        problems.append(f"--prepare_size {args.prepare_size}: the shorter side in pixels, at least 16 (the reference "
                        "resized to 320)")
    if args.workers < 1 or args.shard_images < 1:
        problems.append("--workers and --shard_images must be >= 1")
    if problems:
        parser.error("; ".join(problems))
    return run_tool(lambda: prepare_all(args))


def prepare_all(args) -> int:
    indexes = data.build_indexes(args)
    print(data.format_count_tree(data.count_tree(indexes)))
    manifest = prepare(indexes, args.out, args.prepare_size, args.workers, args.shard_images)
    print(f"done: {manifest['images']} images in {len(manifest['shards'])} shard(s) under {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
