"""The checked pre-training index as plain arrays: cached in --output_dir, and the payload one rank sends the others.

A restarted or requeued job reads `index_cache.npz` instead of indexing again and checking every image on the
filesystem. The cache is used only when its key matches: the format, the code of data/, the working directory, every
data flag, and the size and modification time of every input each source declares (`Source.inputs`: metadata files,
lists, the folders it lists). Anything else (another key, a truncated or foreign file, a file that needs pickle) is
ignored with a log line and the index is rebuilt; it is never trusted. Files are loaded with allow_pickle=False, so
a planted cache cannot run code. An image deleted after the index was cached is caught by --bad_files when read.
"""
import glob
import hashlib
import io
import json
import logging
import os
import zipfile

import numpy as np

from data.base import SourceIndex

logger = logging.getLogger(__name__)

FORMAT = "medical_mae-index/1"
CACHE_NAME = "index_cache.npz"
# flags that decide whether the cache is used, not what the index holds
NOT_KEYED = ("rebuild_index",)
_DATA_DIR = os.path.dirname(os.path.abspath(__file__))


class CacheMismatch(ValueError):
    """The payload is not an index for these inputs and flags (or not an index at all)."""


def _code_digest() -> str:
    h = hashlib.sha256()
    for name in sorted(os.listdir(_DATA_DIR)):
        if name.endswith(".py"):
            with open(os.path.join(_DATA_DIR, name), "rb") as f:
                h.update(name.encode() + b"\0" + f.read())
    return h.hexdigest()


def _stat(path: str) -> list:
    st = os.stat(path)
    return [os.path.abspath(path), st.st_size, st.st_mtime_ns]


def cache_key(cfg, inputs: dict[str, list[str]]) -> dict:
    """What an index depends on; `inputs` maps each source to the files and folders it reads."""
    flags = {k: v for k, v in vars(cfg).items() if k not in NOT_KEYED}
    key = {"format": FORMAT, "code": _code_digest(), "cwd": os.getcwd(), "flags": flags,
           "inputs": {name: [_stat(p) for p in paths] for name, paths in inputs.items()}}
    return json.loads(json.dumps(key))  # as it reads back from a file (tuples become lists)


def encode(indexes: list[SourceIndex], key: dict) -> bytes:
    """An .npz of plain arrays (no object arrays) plus a JSON header."""
    arrays, sources = {}, []
    for k, idx in enumerate(indexes):
        arrays[f"{k}.paths"], arrays[f"{k}.patients"], arrays[f"{k}.views"] = idx.paths, idx.patients, idx.views
        arrays[f"{k}.held_out"] = np.array(sorted(idx.held_out_patients), dtype=np.str_)
        arrays[f"{k}.monitor"] = np.array(idx.monitor_paths, dtype=np.str_)
        if idx.labels is not None:  # 0/1 findings: a byte each, a quarter of the payload's float32
            labels = np.asarray(idx.labels)
            if not np.isin(labels, (0, 1)).all():
                raise ValueError(f"{idx.name}: labels other than 0/1 cannot be cached")
            arrays[f"{k}.labels"] = labels.astype(np.uint8)
        if idx.rows is not None:  # positions in a --prepared_dir store
            arrays[f"{k}.rows"] = np.asarray(idx.rows, dtype=np.int64)
        sources.append({"name": idx.name, "root": idx.root, "held_out_name": idx.held_out_name,
                        "filters": [[why, int(n)] for why, n in idx.filters]})
    header = json.dumps({"key": key, "sources": sources}).encode()
    arrays["header"] = np.frombuffer(header, dtype=np.uint8)
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    return buf.getvalue()


def _array(files, name: str, kind: str, length: int | None = None) -> np.ndarray:
    if name not in files.files:
        raise CacheMismatch(f"no array {name}")
    array = files[name]
    if array.dtype.kind != kind or (length is not None and len(array) != length):
        raise CacheMismatch(f"array {name} has dtype {array.dtype} and length {len(array)}")
    return array


def decode(payload, key: dict | None) -> tuple[list[SourceIndex], dict]:
    """The indexes of `encode` and the key stored with them; raises CacheMismatch unless the payload is a
    well-formed index for `key` (key=None accepts any key: the payload came from rank 0 of this job)."""
    try:
        with np.load(io.BytesIO(payload) if isinstance(payload, bytes) else payload, allow_pickle=False) as files:
            header = json.loads(_array(files, "header", "u").tobytes())
            if header.get("key", {}).get("format") != FORMAT:
                raise CacheMismatch(f"format {header.get('key', {}).get('format')!r}, expected {FORMAT!r}")
            if key is not None and header["key"] != key:
                changed = sorted(k for k in key if header["key"].get(k) != key[k])
                raise CacheMismatch(f"built for other {', '.join(changed)}")
            indexes = []
            for k, source in enumerate(header["sources"]):
                paths = _array(files, f"{k}.paths", "S")
                idx = SourceIndex(source["name"], source["root"], paths,
                                  _array(files, f"{k}.patients", "S", len(paths)),
                                  _array(files, f"{k}.views", "S", len(paths)),
                                  held_out_patients=set(_array(files, f"{k}.held_out", "U").tolist()),
                                  held_out_name=source["held_out_name"],
                                  filters=[(why, n) for why, n in source["filters"]],
                                  monitor_paths=_array(files, f"{k}.monitor", "U").tolist())
                if f"{k}.labels" in files.files:
                    idx.labels = _array(files, f"{k}.labels", "u", len(paths)).astype(np.float32)
                if f"{k}.rows" in files.files:
                    idx.rows = _array(files, f"{k}.rows", "i", len(paths))
                indexes.append(idx)
            return indexes, header["key"]
    except CacheMismatch:
        raise
    except (OSError, ValueError, KeyError, TypeError, EOFError, zipfile.BadZipFile) as e:  # truncated, foreign, pickled
        raise CacheMismatch(f"unreadable ({type(e).__name__}: {e})") from e


def load(path: str, key: dict) -> list[SourceIndex] | None:
    """The cached indexes if `path` holds a valid cache for `key`, else None (with a log line saying why)."""
    if not os.path.isfile(path):
        return None
    try:
        with open(path, "rb") as f:
            return decode(f, key)[0]
    except CacheMismatch as e:
        logger.info("index cache %s not used (%s); rebuilding the index", path, e)
        return None


def save(path: str, payload: bytes) -> None:
    """Write atomically: a reader sees the old cache or the new one, never half of one. Temp files of a writer that
    was killed are removed first (only rank 0 writes)."""
    for stale in glob.glob(glob.escape(path) + ".tmp.*"):
        os.remove(stale)
    tmp = f"{path}.tmp.{os.getpid()}"
    try:
        with open(tmp, "wb") as f:
            f.write(payload)
        os.replace(tmp, path)
    except OSError as e:  # a full or read-only disk costs the next start its speed, not this run
        logger.warning("could not write the index cache %s (%s); the next start indexes again", path, e)
        if os.path.exists(tmp):
            os.remove(tmp)
