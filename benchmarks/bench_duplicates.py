"""tools/find_duplicates.py's two parts at the users' scale: hashing images, and comparing 0.5M pool hashes with 10k
split hashes.

    python -m benchmarks.bench_duplicates [--images 200] [--size 1024] [--pool 500000] [--queries 10000]

Hashing: synthetic radiographs written as --size x --size 8-bit PNGs (NIH's format), hashed in one process
(images/s; the tool spreads this over --workers), then the same images from a prepared store at 320 px
(tools.find_duplicates --pool_prepared), and how far apart the two hashes of an image are.

Comparison: pool and split hashes made from the hashes of distinct
synthetic radiographs with random bits flipped, so they share the structure real chest X-ray hashes share (their
low frequencies agree more than random bits would); the index's time is printed beside a full scan's, measured
on a few queries and scaled to all, in the same run.
"""
import argparse
import os
import tempfile
import time

import numpy as np
from PIL import Image

from data.base import SourceIndex
from data.phash import HashIndex, hamming, phash, phash_file
from data.prepared import PreparedStore, prepare
from data.synthetic import chest_image


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=200, help="images hashed (default: 200)")
    parser.add_argument("--size", type=int, default=1024, help="image side, pixels (default: 1024, as NIH)")
    parser.add_argument("--pool", type=int, default=500_000, help="pool hashes (default: 500000)")
    parser.add_argument("--queries", type=int, default=10_000, help="split hashes (default: 10000)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as folder:
        paths = []
        for k in range(args.images):
            paths.append(os.path.join(folder, f"{k:06d}.png"))
            Image.fromarray(chest_image(args.size, args.size, seed=k)).save(paths[-1])
        start = time.time()
        bases = np.array([phash_file(p) for p in paths])
        seconds = time.time() - start
        index = SourceIndex("bench", folder, np.array(paths, dtype=np.bytes_), np.array(paths, dtype=np.bytes_),
                            [""] * len(paths))
        prepare([index], os.path.join(folder, "prepared"), size=320, workers=1)
        store = PreparedStore(os.path.join(folder, "prepared"))
        start = time.time()
        stored = np.array([phash(store.image(row)) for row in range(len(paths))])
        store_seconds = time.time() - start
    print(f"hashing: {args.images} PNGs of {args.size}x{args.size} in {seconds:.1f} s, "
          f"{args.images / seconds:.1f} images/s per process; from a prepared store (--pool_prepared, 320 px) "
          f"{args.images / store_seconds:.1f} images/s ({seconds / store_seconds:.1f}x), hashes within "
          f"{int(max(hamming(stored[i:i + 1], bases[i])[0] for i in range(len(paths))))} bits of the files'")
    rng = np.random.default_rng(0)
    extra = np.array([phash(Image.fromarray(chest_image(96, 80, seed=10_000 + k))) for k in range(500)])
    bases = np.concatenate([bases, extra])

    def perturbed(n):
        rows = bases[rng.integers(0, len(bases), n)].copy()
        bits = np.unpackbits(rows, axis=1)
        flips = rng.random(bits.shape) < 40 / 256  # about 40 bits each: other images, same anatomy
        return np.packbits(bits ^ flips, axis=1)

    pool, queries = perturbed(args.pool), perturbed(args.queries)
    start = time.time()
    index = HashIndex(pool)
    built = time.time() - start
    start = time.time()
    found = sum(len(index.near(q, 10)[0]) for q in queries)
    indexed = time.time() - start
    sample = 20
    start = time.time()
    for q in queries[:sample]:
        np.flatnonzero(hamming(pool, q) <= 10)
    scan = (time.time() - start) / sample * args.queries
    print(f"comparison: {args.pool} pool x {args.queries} split hashes: index built in {built:.1f} s, queried in "
          f"{indexed:.1f} s ({found} pairs within 10 bits); a full scan would take {scan:.0f} s "
          f"({scan / max(indexed, 1e-9):.0f}x the index)")


if __name__ == "__main__":
    main()
