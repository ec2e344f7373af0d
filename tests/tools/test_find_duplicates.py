"""tools/find_duplicates.py and data/phash.py: planted copies found in a pool of thousands, nothing else."""
import json

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from data.base import SourceIndex
from data.phash import HashIndex, hamming, phash
from data.prepared import prepare
from data.synthetic import chest_image, save_png16, write_dicom
from tests.helpers import run_tool

pytestmark = pytest.mark.slow  # thousands of images written and hashed


def test_the_index_finds_what_a_full_scan_finds():
    rng = np.random.default_rng(0)
    pool = rng.integers(0, 256, (5000, 32), dtype=np.uint8)
    queries = pool[rng.integers(0, 5000, 50)].copy()
    for q in queries:  # flip up to 15 random bits
        for bit in rng.choice(256, rng.integers(0, 16), replace=False):
            q[bit // 8] ^= np.uint8(1 << (bit % 8))
    index = HashIndex(pool)
    for q in queries:
        rows, distances = index.near(q, 15)
        full = np.flatnonzero(hamming(pool, q) <= 15)
        assert sorted(rows) == sorted(full) and np.all(distances == hamming(pool[rows], q))


def test_planted_copies_are_found_and_different_patients_are_not(tmp_path):
    pool_dir, split_dir = tmp_path / "pool" / "images", tmp_path / "split"
    pool_dir.mkdir(parents=True)
    split_dir.mkdir()
    for seed in range(2000):  # the pre-training pool, NIH-like names
        Image.fromarray(chest_image(96, 80, seed=seed)).save(pool_dir / f"{seed:08d}_000.png")
    planted = {}
    for k, seed in enumerate(range(0, 2000, 100)):  # 20 pool images saved again under other names
        pixels, kind = chest_image(96, 80, seed=seed), ("resized", "jpeg", "png16", "dicom")[k % 4]
        name = f"covid-{k:04d}." + {"resized": "png", "jpeg": "jpg", "png16": "png", "dicom": "dcm"}[kind]
        if kind == "resized":
            Image.fromarray(pixels).resize((160, 192), Image.BICUBIC).save(split_dir / name)
        elif kind == "jpeg":
            Image.fromarray(pixels).save(split_dir / name, quality=80)
        elif kind == "png16":
            save_png16(str(split_dir / name), pixels, full_range=True)
        else:
            smaller = np.asarray(Image.fromarray(pixels).resize((64, 77)))
            write_dicom(str(split_dir / name), smaller.astype(np.uint16) * 16)
        planted[str(split_dir / name)] = str(pool_dir / f"{seed:08d}_000.png")
    for seed in range(5000, 5300):  # other patients
        Image.fromarray(chest_image(96, 80, seed=seed)).save(split_dir / f"other-{seed}.png")
    out = tmp_path / "out"
    proc = run_tool("find_duplicates.py", "--pool", str(tmp_path / "pool"), "--split", str(split_dir), "--out",
                    str(out), "--workers", "2", timeout=600)
    assert proc.returncode == 0, proc.stderr
    pairs = pd.read_csv(out / "duplicates.csv")
    assert dict(zip(pairs["split_image"], pairs["pool_image"])) == planted, pairs  # every copy, nothing else
    assert len(pairs) == len(planted) and pairs["distance"].max() <= 10
    assert sorted((out / "exclude_list.txt").read_text().split()) == sorted(planted)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["pool_images"] == 2000 and summary["split_images"] == 320 and "hashed" in proc.stdout
    again = run_tool("find_duplicates.py", "--pool", str(tmp_path / "pool"), "--split", str(split_dir), "--out",
                     str(tmp_path / "again"), "--cache", str(out), "--workers", "2", timeout=600)
    assert "pool: 2000 images, 2000 hashes from the cache, 0 to make" in again.stdout, again.stdout

    # the same pool as a prepared store (tools/prepare_data.py's format): hashed from its pixels, the same pairs
    paths = sorted(str(p) for p in pool_dir.iterdir())
    index = SourceIndex("pool", str(pool_dir), np.array(paths, dtype=np.bytes_), np.array(paths, dtype=np.bytes_),
                        [""] * len(paths))
    prepare([index], str(tmp_path / "prepared"), size=64, workers=2)
    from_store = run_tool("find_duplicates.py", "--pool_prepared", str(tmp_path / "prepared"), "--split",
                          str(split_dir), "--out", str(tmp_path / "store"), "--cache", str(out), "--workers", "2",
                          timeout=600)
    assert from_store.returncode == 0, from_store.stderr
    assert "pool: 2000 prepared images" in from_store.stdout and "hashed 2000/2000" in from_store.stdout
    store_pairs = pd.read_csv(tmp_path / "store" / "duplicates.csv")
    assert dict(zip(store_pairs["split_image"], store_pairs["pool_image"])) == planted, store_pairs
    cached = np.load(next((out).glob("phash_prepared_*.npz")))
    files = np.load(next(p for p in out.glob("phash_pool_*.npz")))
    by_path = dict(zip(files["paths"], files["hashes"]))
    distances = [int(hamming(h.reshape(1, -1), by_path[p])[0]) for p, h in zip(paths, cached["hashes"])]
    assert max(distances) <= 10, max(distances)  # stored pixels (resized to 64) hash as the files do


def test_a_hash_is_stable_under_the_conversions():
    pixels = chest_image(160, 136, seed=7)
    base = phash(Image.fromarray(pixels))
    assert hamming(phash(Image.fromarray(pixels).resize((80, 68))).reshape(1, -1), base)[0] <= 6


def test_a_listed_image_that_is_missing_is_named(tmp_path):
    (tmp_path / "pool").mkdir()
    Image.fromarray(chest_image(32, 32, seed=0)).save(tmp_path / "pool" / "x.png")
    (tmp_path / "list.txt").write_text("patient1 a.png normal rsna\n")
    proc = run_tool("find_duplicates.py", "--pool", str(tmp_path / "pool"), "--split", str(tmp_path / "list.txt"),
                    "--out", str(tmp_path / "out"))
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    assert f"--split: 1 listed image(s) not found, e.g. ['{tmp_path}/a.png']; check the list and --split_root" in \
        proc.stderr, proc.stderr
