"""Prepared dataset: images decoded once to 8-bit gray, shorter side resized, in large memory-mapped shards.

Layout of a prepared folder:
  shard_00000.u8 ...   raw uint8 pixels, image after image (np.memmap)
  shard_00000.npz ...  that shard's records: source, path, patient, view, original size, offset, height, width
  held_out.json        each source's held-out patients, so the leakage guard still works without the originals
  manifest.json        format, size, counts, sha256 of every shard and of the inputs (written last)

Shards are written one at a time (pixels, then records, each by atomic rename), so an interrupted preparation
resumes at the first missing shard. Training reads the same records, in the same order, as it would from the
original files (the filters ran before preparation); caps and weights are applied at training time as usual.
"""
import datetime
import hashlib
import json
import logging
import multiprocessing
import os
import time

import numpy as np
from PIL import Image

from data.base import SourceIndex
from data.image_io import load_gray

logger = logging.getLogger(__name__)

FORMAT = "medical_mae-prepared/1"
MANIFEST = "manifest.json"


def _resize_shorter(image: Image.Image, size: int) -> Image.Image:
    w, h = image.size
    scale = size / min(w, h)
    if scale >= 1:
        return image
    return image.resize((max(1, round(w * scale)), max(1, round(h * scale))), Image.BICUBIC, reducing_gap=3.0)


def _prepare_one(job):
    path, size = job
    image = load_gray(path, min_side=size)  # DCT-scaled JPEG decode, never below the target size
    original = image.size if not path.lower().endswith((".jpg", ".jpeg")) else Image.open(path).size
    pixels = np.asarray(_resize_shorter(image, size), dtype=np.uint8)
    return pixels, original


def _records(indexes: list[SourceIndex]):
    for idx in indexes:
        for path, patient, view in zip(idx.paths, idx.patients, idx.views):
            yield idx.name, path.decode(), patient.decode(), view.decode()


def inputs_digest(records: list[tuple], size: int) -> str:
    h = hashlib.sha256(f"{FORMAT}:{size}".encode())
    for record in records:
        h.update("\0".join(record).encode() + b"\n")
    return h.hexdigest()


def _sha256(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 24), b""):
            h.update(block)
    return h.hexdigest()


def prepare(indexes: list[SourceIndex], out_dir: str, size: int = 320, workers: int = 1,
            shard_images: int = 8192) -> dict:
    """Decode, resize and pack every record of `indexes` into out_dir; resumable. Returns the manifest."""
    records = list(_records(indexes))
    digest = inputs_digest(records, size)
    os.makedirs(out_dir, exist_ok=True)
    stamp = os.path.join(out_dir, "inputs.sha256")
    if os.path.exists(stamp) and open(stamp).read().strip() != digest:
        raise ValueError(f"{out_dir} holds a preparation of other inputs or another --prepare_size; "
                         "choose an empty folder")
    with open(stamp, "w") as f:
        f.write(digest)
    shards = [records[i:i + shard_images] for i in range(0, len(records), shard_images)]
    start, done = time.time(), 0
    ctx = multiprocessing.get_context("spawn")
    with ctx.Pool(max(workers, 1)) as pool:
        for k, shard in enumerate(shards):
            if not os.path.exists(os.path.join(out_dir, f"shard_{k:05d}.npz")):
                _write_shard(pool, shard, size, out_dir, k)
            done += len(shard)
            rate = done / max(time.time() - start, 1e-9)
            eta = datetime.timedelta(seconds=int((len(records) - done) / max(rate, 1e-9)))
            logger.info("prepared %d/%d images (shard %d/%d), %.0f img/s, eta %s", done, len(records), k + 1,
                        len(shards), rate, eta)
    with open(os.path.join(out_dir, "held_out.json"), "w") as f:
        json.dump({idx.name: sorted(idx.held_out_patients) for idx in indexes}, f)
    manifest = {
        "format": FORMAT, "prepare_size": size, "inputs_sha256": digest, "images": len(records),
        "sources": {idx.name: len(idx) for idx in indexes},
        "shards": [{"name": f"shard_{k:05d}", "sha256_u8": _sha256(os.path.join(out_dir, f"shard_{k:05d}.u8")),
                    "sha256_npz": _sha256(os.path.join(out_dir, f"shard_{k:05d}.npz"))} for k in range(len(shards))],
    }
    with open(os.path.join(out_dir, MANIFEST + ".tmp"), "w") as f:
        json.dump(manifest, f, indent=2)
    os.replace(os.path.join(out_dir, MANIFEST + ".tmp"), os.path.join(out_dir, MANIFEST))
    return manifest


def _write_shard(pool, shard, size, out_dir, k) -> None:
    base = os.path.join(out_dir, f"shard_{k:05d}")
    offsets, heights, widths, originals, offset = [], [], [], [], 0
    with open(base + ".u8.tmp", "wb") as f:
        for pixels, original in pool.imap(_prepare_one, [(r[1], size) for r in shard], chunksize=16):
            f.write(pixels.tobytes())
            offsets.append(offset)
            heights.append(pixels.shape[0])
            widths.append(pixels.shape[1])
            originals.append(original)
            offset += pixels.size
    os.replace(base + ".u8.tmp", base + ".u8")
    columns = list(zip(*shard))
    with open(base + ".npz.tmp", "wb") as f:
        np.savez(f, source=np.array(columns[0]), path=np.array(columns[1]), patient=np.array(columns[2]),
                 view=np.array(columns[3]), offset=np.array(offsets, np.int64), height=np.array(heights, np.int32),
                 width=np.array(widths, np.int32), original=np.array(originals, np.int32))
    os.replace(base + ".npz.tmp", base + ".npz")


class PreparedStore:
    """Read-only view of a prepared folder; shards are memory-mapped lazily, once per process."""

    def __init__(self, folder: str):
        manifest_path = os.path.join(folder, MANIFEST)
        if not os.path.isfile(manifest_path):
            raise FileNotFoundError(f"--prepared_dir {folder} has no {MANIFEST}: run tools/prepare_data.py (it "
                                    "resumes if it was interrupted)")
        with open(manifest_path) as f:
            self.manifest = json.load(f)
        if self.manifest.get("format") != FORMAT:
            raise ValueError(f"{manifest_path}: format {self.manifest.get('format')!r}, expected {FORMAT!r}")
        self.folder = folder
        parts = [np.load(os.path.join(folder, s["name"] + ".npz")) for s in self.manifest["shards"]]
        self.columns = {key: np.concatenate([p[key] for p in parts]) for key in parts[0].files} if parts else {}
        self.shard_of = np.concatenate([np.full(len(p["path"]), k, np.int32) for k, p in enumerate(parts)])
        with open(os.path.join(folder, "held_out.json")) as f:
            self.held_out = json.load(f)
        self._maps = {}

    def __getstate__(self):
        state = dict(self.__dict__)
        state["_maps"] = {}  # a pickled memmap would copy its data into every worker
        return state

    def source_index(self, name: str) -> SourceIndex:
        """The source's records as a SourceIndex whose `rows` point into this store."""
        rows = np.flatnonzero(self.columns["source"] == name)
        if not len(rows):
            raise ValueError(f"--prepared_dir {self.folder} has no images of '{name}'; it holds "
                             f"{sorted(self.manifest['sources'])}")
        idx = SourceIndex(name, self.folder, self.columns["path"][rows], self.columns["patient"][rows],
                          self.columns["view"][rows], held_out_patients=set(self.held_out.get(name, [])),
                          held_out_name="held-out split (from preparation)",
                          filters=[("prepared", len(rows))], rows=rows)
        return idx

    def image(self, row: int) -> Image.Image:
        shard = int(self.shard_of[row])
        if shard not in self._maps:
            path = os.path.join(self.folder, self.manifest["shards"][shard]["name"] + ".u8")
            self._maps[shard] = np.memmap(path, dtype=np.uint8, mode="r")
        h, w = int(self.columns["height"][row]), int(self.columns["width"][row])
        offset = int(self.columns["offset"][row])
        return Image.fromarray(np.array(self._maps[shard][offset:offset + h * w]).reshape(h, w))

    def verify(self) -> list[str]:
        """Shards whose checksum does not match the manifest."""
        bad = []
        for shard in self.manifest["shards"]:
            for ext in ("u8", "npz"):
                if _sha256(os.path.join(self.folder, f"{shard['name']}.{ext}")) != shard[f"sha256_{ext}"]:
                    bad.append(f"{shard['name']}.{ext}")
        return bad
