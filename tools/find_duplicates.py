"""Find downstream test images that are also in a pre-training pool, under another name or in another format.

    python -m tools.find_duplicates --pool data/nih_chestxray/images --split data/covidx/test_COVIDx9A.txt \
        --split_root data/covidx/test --out dups/covidx_vs_nih --workers 16

COVIDx's normal and pneumonia images come from the RSNA challenge, which drew them from NIH ChestX-ray14; a model
pre-trained on NIH may have seen them. Every image of the pool and of the split is hashed once with a perceptual
hash (data/phash.py: 256 bits, robust to resizing, JPEG/PNG/DICOM re-encoding and bit depth), in --workers
processes with progress and an ETA; the hashes are cached in --cache (default: --out) by path, size and
modification time, saved as they are made, so an interrupted run resumes and a rerun hashes only new files. Each
split image is then looked up in an index over the pool's hash bits (no pairwise loop) for pool images within
--max_distance bits.

--pool and --split take folders (every PNG/JPEG/DICOM/MetaImage below) or list files (each line's first token that
ends with an image extension, relative to --split_root, or to the list's folder). --pool_prepared takes a
tools/prepare_data.py folder instead of --pool: its images are already decoded and resized, so hashing reads memory-
mapped pixels and decodes nothing (the pairs name the original files it records). Decoding dominates hashing, so this
is the fast way for a pool of 0.5M images; the hashes agree with the files' to a few bits (tested).

Writes OUT/duplicates.csv (split image, pool image, distance), OUT/exclude_list.txt (the split images with a
near-duplicate, for fine-tuning's --exclude_list) and OUT/summary.json.
"""
import argparse
import datetime
import hashlib
import json
import multiprocessing
import os
import sys
import time

import numpy as np
import pandas as pd

from data.checks import files_exist
from data.phash import MAX_INDEXED_DISTANCE, HashIndex, phash, phash_file
from data.prepared import PreparedStore
from tools.reporting import check_outputs, run_tool
from util.errors import SetupError
from util.log import write_json, write_text

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".dcm", ".dicom", ".mha", ".mhd")
SAVE_EVERY = 2000  # hashes between cache writes
STORE_CHUNK = 256  # prepared images per worker task


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pool", nargs="+", default=None, help="the pre-training images: folders or list files")
    parser.add_argument("--pool_prepared", default=None, metavar="DIR",
                        help="instead of --pool: a tools/prepare_data.py folder, hashed from its stored pixels")
    parser.add_argument("--split", nargs="+", required=True, help="the downstream images: folders or list files")
    parser.add_argument("--split_root", default=None, help="folder the split lists' paths are relative to "
                        "(default: each list's folder)")
    parser.add_argument("--pool_root", default=None, help="folder the pool lists' paths are relative to "
                        "(default: each list's folder)")
    parser.add_argument("--out", required=True, help="folder for duplicates.csv, exclude_list.txt, summary.json")
    parser.add_argument("--cache", default=None, help="folder of the hash cache (default: --out)")
    parser.add_argument("--max_distance", type=int, default=10,
                        help=f"largest Hamming distance (of 255 bits) called a duplicate, at most "
                             f"{MAX_INDEXED_DISTANCE} (default: 10)")
    parser.add_argument("--workers", type=int, default=os.cpu_count(), help="hashing processes (default: all cores)")
    parser.add_argument("--overwrite", action="store_true", help="replace existing results in --out (default: off)")
    args = parser.parse_args(argv)
    if not 0 <= args.max_distance <= MAX_INDEXED_DISTANCE:
        parser.error(f"--max_distance must be in [0, {MAX_INDEXED_DISTANCE}], got {args.max_distance}")
    if args.workers < 1:
        parser.error(f"--workers must be >= 1, got {args.workers}")
    if bool(args.pool) == bool(args.pool_prepared):
        parser.error("give the pre-training pool as --pool (folders or lists) or as --pool_prepared (a "
                     "tools/prepare_data.py folder), one of the two")
    return run_tool(lambda: find_duplicates(args))


def list_images(sources: list[str], root: str | None, flag: str) -> list[str]:
    walked, listed = [], []  # a walked file exists; a listed one is checked
    for source in sources:
        if os.path.isdir(source):
            for folder, _, files in os.walk(source):
                walked += [os.path.join(folder, f) for f in files if f.lower().endswith(IMAGE_EXTENSIONS)]
        elif os.path.isfile(source):
            base = root or os.path.dirname(os.path.abspath(source))
            with open(source, encoding="utf-8-sig") as f:
                for line in f:
                    token = next((t for t in line.replace(",", " ").split() if t.lower().endswith(IMAGE_EXTENSIONS)),
                                 None)
                    if token is not None:
                        listed.append(token if os.path.isabs(token) else os.path.join(base, token))
        else:
            raise SetupError(f"{flag}: {source} is neither a folder nor a list file")
    listed_array = np.array(listed, dtype=np.bytes_)
    missing = [p.decode() for p in listed_array[~files_exist(listed_array)]] if listed else []
    paths = walked + listed
    if missing:
        raise SetupError(f"{flag}: {len(missing)} listed image(s) not found, e.g. {missing[:3]}; check the list and "
                         f"{'--split_root' if flag == '--split' else '--pool_root'}")
    if not paths:
        raise SetupError(f"{flag} {' '.join(sources)}: no image found")
    return sorted(set(paths))


def _hash_one(path: str):
    try:
        return path, phash_file(path), None
    except (OSError, RuntimeError, ValueError) as e:  # a file that does not decode is reported, not hashed
        return path, None, str(e)


def hashes_of(paths: list[str], cache_dir: str, workers: int, what: str) -> tuple[np.ndarray, list[str], list]:
    """(uint8 [N, 32] hashes, their paths, 'path: problem' of the files that do not decode): from the cache where the
    file is unchanged, the rest made in workers, with progress and the cache saved every SAVE_EVERY hashes."""
    os.makedirs(cache_dir, exist_ok=True)
    key = hashlib.sha256("\n".join(paths).encode()).hexdigest()[:16]
    cache_path = os.path.join(cache_dir, f"phash_{what}_{key}.npz")
    stamps = {p: (s.st_size, s.st_mtime_ns) for p, s in ((p, os.stat(p)) for p in paths)}
    known = {}
    if os.path.isfile(cache_path):
        with np.load(cache_path, allow_pickle=False) as cached:
            for p, size, mtime, h in zip(cached["paths"], cached["sizes"], cached["mtimes"], cached["hashes"]):
                if stamps.get(str(p)) == (int(size), int(mtime)):
                    known[str(p)] = h
    todo = [p for p in paths if p not in known]
    print(f"{what}: {len(paths)} images, {len(paths) - len(todo)} hashes from the cache, {len(todo)} to make",
          flush=True)
    bad = []

    def save():
        done = list(known)
        tmp = cache_path + f".tmp.{os.getpid()}.npz"
        np.savez(tmp, paths=np.array(done), sizes=np.array([stamps[p][0] for p in done], dtype=np.int64),
                 mtimes=np.array([stamps[p][1] for p in done], dtype=np.int64),
                 hashes=np.array([known[p] for p in done], dtype=np.uint8).reshape(-1, 32))
        os.replace(tmp, cache_path)

    if todo:
        start = time.time()
        with multiprocessing.get_context("spawn").Pool(min(workers, len(todo))) as pool:
            for k, (path, h, problem) in enumerate(pool.imap_unordered(_hash_one, todo, chunksize=64), start=1):
                if h is None:
                    bad.append(f"{path}: {problem}")
                else:
                    known[path] = h
                if k % SAVE_EVERY == 0 or k == len(todo):
                    save()
                    report_progress(what, k, len(todo), start)
    rows = np.zeros((len(paths), 32), dtype=np.uint8)
    present = np.array([p in known for p in paths])
    for i, p in enumerate(paths):
        if present[i]:
            rows[i] = known[p]
    return rows[present], [p for p, ok in zip(paths, present) if ok], bad


_STORES = {}  # per worker process: the prepared store, opened once


def _hash_stored(job):
    folder, rows = job
    if folder not in _STORES:
        _STORES[folder] = PreparedStore(folder)
    store = _STORES[folder]
    return rows, np.stack([phash(store.image(int(r))) for r in rows])


def report_progress(what: str, done: int, total: int, start: float) -> None:
    rate = done / max(time.time() - start, 1e-9)
    eta = datetime.timedelta(seconds=int((total - done) / max(rate, 1e-9)))
    print(f"{what}: hashed {done}/{total}, {rate:.0f} images/s, eta {eta}", flush=True)


def hashes_of_store(folder: str, cache_dir: str, workers: int) -> tuple[np.ndarray, list[str], list]:
    """(hashes, the original paths the store records, []) of every image of a prepared store, hashed from its
    pixels in workers, chunk by chunk; the cache (keyed by the store's manifest) is saved as it grows, so an
    interrupted run resumes."""
    store = PreparedStore(folder)
    paths = [p.decode() if isinstance(p, bytes) else str(p) for p in store.columns["path"]]
    key = hashlib.sha256(json.dumps(store.manifest, sort_keys=True).encode()).hexdigest()[:16]
    os.makedirs(cache_dir, exist_ok=True)
    cache_path = os.path.join(cache_dir, f"phash_prepared_{key}.npz")
    hashes, done = np.zeros((len(paths), 32), dtype=np.uint8), np.zeros(len(paths), dtype=bool)
    if os.path.isfile(cache_path):
        with np.load(cache_path) as cached:
            hashes[:], done[:] = cached["hashes"], cached["done"]
    todo = np.flatnonzero(~done)
    print(f"pool: {len(paths)} prepared images in {folder}, {len(paths) - len(todo)} hashes from the cache, "
          f"{len(todo)} to make", flush=True)

    def save():
        tmp = cache_path + f".tmp.{os.getpid()}.npz"
        np.savez(tmp, hashes=hashes, done=done)
        os.replace(tmp, cache_path)

    if len(todo):
        chunks = [todo[i:i + STORE_CHUNK] for i in range(0, len(todo), STORE_CHUNK)]
        start, made, saved = time.time(), 0, 0
        with multiprocessing.get_context("spawn").Pool(min(workers, len(chunks))) as pool:
            for rows, made_hashes in pool.imap_unordered(_hash_stored, [(folder, c) for c in chunks]):
                hashes[rows], done[rows] = made_hashes, True
                made += len(rows)
                if made - saved >= SAVE_EVERY or made == len(todo):
                    save()
                    saved = made
                    report_progress("pool", made, len(todo), start)
    return hashes, paths, []


def find_duplicates(args) -> int:
    outputs = [os.path.join(args.out, n) for n in ("duplicates.csv", "exclude_list.txt", "summary.json")]
    check_outputs(outputs, [], args.overwrite)
    split_paths = list_images(args.split, args.split_root, "--split")
    cache = args.cache or args.out
    if args.pool_prepared:
        pool_hashes, pool_paths, pool_bad = hashes_of_store(args.pool_prepared, cache, args.workers)
    else:
        pool_hashes, pool_paths, pool_bad = hashes_of(list_images(args.pool, args.pool_root, "--pool"), cache,
                                                      args.workers, "pool")
    split_hashes, split_paths, split_bad = hashes_of(split_paths, cache, args.workers, "split")
    start = time.time()
    index = HashIndex(pool_hashes)
    pairs = []
    for i, query in enumerate(split_hashes):
        rows, distances = index.near(query, args.max_distance)
        pairs += [(split_paths[i], pool_paths[r], int(d)) for r, d in zip(rows, distances)]
    seconds = time.time() - start
    os.makedirs(args.out, exist_ok=True)
    table = pd.DataFrame(pairs, columns=["split_image", "pool_image", "distance"]).sort_values(
        ["distance", "split_image"])
    duplicated = sorted(set(table["split_image"]))
    write_text(outputs[0], table.to_csv(index=False))
    write_text(outputs[1], "".join(p + "\n" for p in duplicated))
    summary = {"pool_images": len(pool_paths), "split_images": len(split_paths), "pairs": len(pairs),
               "split_images_with_a_duplicate": len(duplicated), "max_distance": args.max_distance,
               "comparison_seconds": round(seconds, 3), "undecodable": pool_bad + split_bad}
    write_json(outputs[2], summary)
    print(f"{len(duplicated)} of {len(split_paths)} split images have a near-duplicate among {len(pool_paths)} pool "
          f"images ({len(pairs)} pairs within {args.max_distance} bits; compared in {seconds:.1f} s)")
    if pool_bad or split_bad:
        print(f"{len(pool_bad) + len(split_bad)} file(s) did not decode and were not compared (listed in "
              f"{outputs[2]})", file=sys.stderr)
    print(f"wrote {', '.join(outputs)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
