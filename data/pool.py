"""The checked index of the pre-training pool: every source indexed, filtered and checked (or read from the index cache
in output_dir), then capped, weighted and guarded against leakage. What rank 0 builds and shares with the others."""
import os
from dataclasses import dataclass

from data import checks, index_cache
from data.base import SourceIndex
from data.config import SOURCES, DataConfig, data_config, parse_pairs
from data.filters import resample, view_filter
from data.leakage import check_leakage
from data.prepared import PreparedStore


def open_prepared(args) -> PreparedStore | None:
    return PreparedStore(args.prepared_dir) if args.prepared_dir else None


def _checked_indexes(args: DataConfig, check_files: bool, store: PreparedStore | None) -> list[SourceIndex]:
    """Every source indexed, view-filtered and (check_files) checked on the filesystem: what the index cache holds."""
    views = parse_pairs(args.views, "--views")
    indexes = []
    for name in args.datasets_names:
        source = SOURCES[name]
        if store is not None:
            idx = store.source_index(name)  # filtered and checked when it was prepared
        else:
            idx = source.index(args)
            view_filter(idx, source, views.get(name))
        if check_files and store is None:
            checks.check_files(idx, args.bad_files)
            checks.check_sample_decodes(idx, args.startup_check, args.bad_files)
        indexes.append(idx)
    return indexes


def _finish(args: DataConfig, indexes: list[SourceIndex]) -> list[SourceIndex]:
    """Caps, weights and the leakage guard: cheap, so they run on every start, from a cache or not."""
    caps, weights = parse_pairs(args.source_cap, "--source_cap"), parse_pairs(args.source_weight, "--source_weight")
    for idx in indexes:
        resample(idx, caps.get(idx.name), weights.get(idx.name), seed=0)
        if len(idx) == 0:
            raise ValueError(f"{idx.name}: no images left after the filters ({idx.filters}); check --views and the "
                             "data")
    if args.leakage_check:
        check_leakage(indexes)
    return indexes


def build_indexes(args, check_files: bool = True, store: PreparedStore | None = None) -> list[SourceIndex]:
    """Index, filter and check every source named in --datasets_names.

    check_files=False leaves missing and undecodable files in the index (tools/verify_data.py reports them).
    `store` is the already opened --prepared_dir, if the caller has it.
    """
    args = data_config(args)
    store = store if store is not None else open_prepared(args)
    return _finish(args, _checked_indexes(args, check_files, store))


@dataclass
class IndexPool:
    """The checked index of every source, as the training job starts from it."""

    indexes: list[SourceIndex]
    origin: str  # how this start got it: built and checked, or read from the cache
    store: PreparedStore | None = None  # the opened --prepared_dir, so the dataset does not open it again

    def encode(self) -> bytes:
        """The payload rank 0 sends the other ranks (index_cache format, key omitted: they trust their rank 0)."""
        return index_cache.encode(self.indexes, {"format": index_cache.FORMAT, "origin": self.origin})

    @classmethod
    def decode(cls, payload: bytes) -> "IndexPool":
        indexes, key = index_cache.decode(payload, key=None)
        return cls(indexes, key["origin"])


def build_index_pool(args, cache_dir: str | None = None) -> IndexPool:
    """The checked index: read from `cache_dir`/index_cache.npz when it is valid for these inputs and flags (no
    file on the image tree is touched), else built, checked and written there for the next start. Without
    cache_dir, or with --prepared_dir (already one checked file), there is no cache. Caps, weights and the leakage
    guard run after either. --rebuild_index ignores a valid cache."""
    args = data_config(args)
    store = open_prepared(args)
    if cache_dir is None or store is not None:
        return IndexPool(build_indexes(args, store=store), "built and checked", store)
    path = os.path.join(cache_dir, index_cache.CACHE_NAME)
    key = index_cache.cache_key(args, {name: SOURCES[name].inputs(args) for name in args.datasets_names})
    cached = None if args.rebuild_index else index_cache.load(path, key)
    if cached is not None:
        return IndexPool(_finish(args, cached), f"read from {path} (no file checks)")
    indexes = _checked_indexes(args, check_files=True, store=None)
    index_cache.save(path, index_cache.encode(indexes, key))
    why = " (--rebuild_index)" if args.rebuild_index else ""
    return IndexPool(_finish(args, indexes), f"built and checked{why}; cached in {path}")
