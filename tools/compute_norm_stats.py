"""Mean and std of the chosen sources' pixels (after decoding to 8-bit gray and resizing), for --norm_stats.

    python -m tools.compute_norm_stats --data_path data --datasets_names chexpert chestxray_nih \
        --max_images 5000 --out cxr_stats.json
    python main_pretrain_multi_datasets_xray.py ... --norm_stats cxr_stats.json
"""
import argparse
import os
import sys

import numpy as np

import data
from data.image_io import load_gray
from tools.reporting import check_outputs, run_tool
from util.errors import SetupError
from util.log import write_json


def pixel_stats(paths: list[str], size: int) -> tuple[float, float]:
    """Pooled mean/std over every pixel of every image, in [0, 1] units."""
    total = total_sq = count = 0.0
    for path in paths:
        pixels = np.asarray(load_gray(path).resize((size, size)), dtype=np.float64) / 255.0
        total += pixels.sum()
        total_sq += (pixels**2).sum()
        count += pixels.size
    mean = total / count
    return mean, float(np.sqrt(max(total_sq / count - mean**2, 0.0)))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    data.add_data_args(parser, training=False)
    parser.add_argument("--max_images", type=int, default=5000,
                        help="a fixed random sample of this size (default: 5000)")
    parser.add_argument("--out", required=True, help="JSON file to write ({'mean': m, 'std': s, ...})")
    parser.add_argument("--overwrite", action="store_true", help="replace --out if it exists (default: off)")
    args = parser.parse_args()
    return run_tool(lambda: compute(args))


def compute(args) -> int:
    if args.max_images < 1:
        raise SetupError(f"--max_images must be >= 1, got {args.max_images}")
    if args.bad_files != "error":
        raise SetupError("--bad_files skip: the statistics must come from images that decode; fix or leave out the "
                         "bad files (tools/verify_data.py lists them)")
    check_outputs([args.out], [], args.overwrite)
    if not os.path.isdir(os.path.dirname(os.path.abspath(args.out))):
        raise SetupError(f"--out {args.out}: the folder {os.path.dirname(os.path.abspath(args.out))} does not exist")
    paths = [p.decode() for idx in data.build_indexes(args) for p in idx.paths]
    rng = np.random.default_rng(0)
    sample = sorted(rng.choice(paths, min(args.max_images, len(paths)), replace=False).tolist())
    mean, std = pixel_stats(sample, args.input_size)
    stats = {"mean": mean, "std": std, "images": len(sample), "sources": args.datasets_names}
    write_json(args.out, stats)
    print(f"mean {mean:.4f} std {std:.4f} over {len(sample)} images -> {args.out} (use --norm_stats {args.out})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
