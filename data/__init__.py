"""Multi-source chest X-ray pre-training data: a registry of sources and one builder.

Public API, also for other self-supervised code (the paper's MoCo v2 baselines used this loader):

    from data import build_pretrain_dataset
    dataset, counts = build_pretrain_dataset(["chexpert", "chestxray_nih"], data_path="data",
                                             transform=TwoCropsTransform(...))

Each item is (transform(gray PIL image), replaced_flag).
"""
import argparse
import copy
import dataclasses
import itertools
import logging
import os
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np

from data import index_cache
from data.base import BAD_FILE_POLICIES, BadImageError, ConcatSources, Source, SourceIndex, XrayDataset
from data.chestxray_nih import ChestXrayNIH
from data.chexpert import CheXpert
from data.folder import Folder
from data.gpu_augment import BatchAugment, CanvasTransform
from data.image_io import decode_problem
from data.leakage import DataLeakageError, check_leakage
from data.mimic_cxr import MimicCXR
from data.monitor import MonitorBatch, ProbeSubset, monitor_batch, probe_subset
from data.padchest import PadChest
from data.prepared import PreparedStore
from data.transforms import build_train_transform, check_norm_policy, norm_stats_for
from data.vindr_cxr import VinDrCXR
from util.args import add_bool_flag

__all__ = ["SOURCES", "BadImageError", "DataConfig", "DataLeakageError", "IndexPool", "PretrainData",
           "add_data_args", "build_index_pool", "build_indexes", "build_pretrain_data", "build_pretrain_dataset",
           "check_data_args", "count_tree", "data_config", "format_count_tree"]

logger = logging.getLogger(__name__)

SOURCES: dict[str, Source] = {s.name: s for s in (CheXpert(), ChestXrayNIH(), MimicCXR(), PadChest(), VinDrCXR(),
                                                  Folder())}


def add_data_args(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("Data")
    g.add_argument("--data_path", default="data", type=str,
                   help="root holding the datasets in the reference layout: CheXpert-v1.0-small/, nih_chestxray/, "
                        "mimic_cxr/ (default: data)")
    g.add_argument("--datasets_names", nargs="+", default=["chexpert", "chestxray_nih"],
                   help=f"sources to pre-train on, any of {list(SOURCES)} (default: chexpert chestxray_nih)")
    for name, source in SOURCES.items():
        g.add_argument(f"--{name}_root", default=None, type=str,
                       help=f"folder of {name}, overriding --data_path/{source.default_dir}")
        source.add_args(g)
    g.add_argument("--input_size", default=224, type=int, help="images input size (default: 224)")
    g.add_argument("--in_chans", default=3, type=int, choices=[1, 3],
                   help="model input channels; 1 is native grayscale, 3 repeats the gray plane (default: 3)")
    g.add_argument("--random_resize_range", type=float, nargs=2, default=None, metavar=("MIN", "MAX"),
                   help="RandomResizedCrop scale range, e.g. 0.5 1.0; unset means a plain resize (default: unset)")
    g.add_argument("--norm_stats", default="dataset", type=str,
                   help="normalisation: 'dataset' (reference per-source mean/std), 'imagenet', 'cxr' (0.5056/0.252), "
                        "'MEAN,STD', or a JSON file from tools/compute_norm_stats.py (default: dataset)")
    g.add_argument("--views", action="append", default=[], metavar="SOURCE=V1,V2",
                   help="view filter per source, e.g. chexpert=AP,PA or mimic_cxr=all; defaults: chexpert frontal, "
                        "mimic_cxr AP,PA (repeatable)")
    g.add_argument("--source_cap", action="append", default=[], metavar="SOURCE=N",
                   help="use at most N images of SOURCE, a fixed random subset (repeatable)")
    g.add_argument("--source_weight", action="append", default=[], metavar="SOURCE=W",
                   help="resample SOURCE to W times its size per epoch, e.g. 0.5 or 2 (repeatable)")
    g.add_argument("--bad_files", default="error", choices=BAD_FILE_POLICIES,
                   help="a missing or undecodable image: 'error' stops with its path; 'skip' replaces it, "
                        "counts it and logs its path (default: error)")
    g.add_argument("--prepared_dir", default=None, type=str,
                   help="train from a folder written by tools/prepare_data.py instead of the original files "
                        "(same images, same order; default: off)")
    add_bool_flag(g, "jpeg_draft", False,
                  "decode JPEGs at 1/2, 1/4 or 1/8 scale (libjpeg DCT scaling) when the crop does not need full "
                  "resolution; about 1.5x the full-size pipeline on full-resolution quality-95 JPEGs, where entropy "
                  "decoding dominates (benchmarks/RESULTS.md)")
    add_bool_flag(g, "gpu_augment", False,
                  "run crop, resize, flip and normalise on the training device as one batched operation; the "
                  "workers only place the decoded image on a fixed canvas")
    g.add_argument("--gpu_augment_canvas", default=416, type=int,
                   help="canvas side for --gpu_augment; larger images are shrunk to fit (default: 416, for data "
                        "prepared at 320)")
    g.add_argument("--startup_check", default=16, type=int,
                   help="decode this many images of each source at start-up, so unreadable files fail before "
                        "training (default: 16; tools/verify_data.py checks every file)")
    add_bool_flag(g, "leakage_check", True, "fail if a pre-training patient is in a source's own test/validation split")
    g.add_argument("--rebuild_index", action="store_true",
                   help="index and check every image again even if output_dir/index_cache.npz is valid (it is "
                        "rebuilt anyway when a metadata file, list, image folder or data flag changes)")


def _data_flag_defaults() -> dict:
    parser = argparse.ArgumentParser(add_help=False)
    add_data_args(parser)
    return vars(parser.parse_args([]))


# One field per data flag, generated from add_data_args so the flags stay the single source of names and defaults.
DataConfig = dataclasses.make_dataclass(
    "DataConfig", [(name, object, dataclasses.field(default_factory=lambda v=value: copy.deepcopy(v)))
                   for name, value in _data_flag_defaults().items()])
DataConfig.__doc__ = "The data flags (add_data_args), and nothing else: what every source and builder in data/ reads."
DATA_FIELDS = tuple(f.name for f in dataclasses.fields(DataConfig))


def data_config(args=None, **overrides) -> DataConfig:
    """A DataConfig from parsed args (their data flags; a missing one takes its default) and/or keyword overrides.
    An unknown keyword is an error that lists the valid ones."""
    if isinstance(args, DataConfig) and not overrides:
        return args
    unknown = sorted(set(overrides) - set(DATA_FIELDS))
    if unknown:
        raise TypeError(f"unknown data option(s) {unknown}; valid: {list(DATA_FIELDS)}")
    given = {} if args is None else {k: v for k, v in vars(args).items() if k in DATA_FIELDS}
    return DataConfig(**{**given, **overrides})


def _pairs(items: list[str], flag: str) -> dict[str, str]:
    out = {}
    for item in items:
        name, sep, value = item.partition("=")
        if not sep or name not in SOURCES:
            raise ValueError(f"{flag} takes SOURCE=VALUE with SOURCE in {list(SOURCES)}, got '{item}'")
        out[name] = value
    return out


def check_data_args(args) -> list[str]:
    """Problems with the data flags, each naming its flag (empty if none)."""
    args = data_config(args)
    problems = []
    unknown = [n for n in args.datasets_names if n not in SOURCES]
    if unknown:
        problems.append(f"--datasets_names: unknown source(s) {unknown}; choose from {list(SOURCES)}")
    for flag in ("views", "source_cap", "source_weight"):
        try:
            values = _pairs(getattr(args, flag), f"--{flag}")
            if flag != "views":
                [float(v) for v in values.values()]
        except ValueError as e:
            problems.append(str(e))
    if args.gpu_augment and not args.random_resize_range:
        problems.append("--gpu_augment reproduces RandomResizedCrop: give --random_resize_range (e.g. 0.5 1.0)")
    if (issue := check_norm_policy(args.norm_stats)) is not None:
        problems.append(issue)
    if args.random_resize_range and not 0 < args.random_resize_range[0] <= args.random_resize_range[1] <= 1:
        problems.append(f"--random_resize_range must satisfy 0 < MIN <= MAX <= 1, got {args.random_resize_range}")
    return problems


def _view_filter(idx: SourceIndex, source: Source, requested: str | None) -> None:
    views = requested.split(",") if requested else list(source.default_views)
    if not views or views == ["all"]:
        return
    if views == ["frontal"]:
        idx.select(idx.views != b"Lateral", "frontal views")
        return
    idx.select(np.isin(idx.views, np.array(views, dtype=np.bytes_)), f"views {','.join(views)}")


def _resample(idx: SourceIndex, cap: str | None, weight: str | None, seed: int) -> None:
    """A fixed random subset (cap) or resampling to weight x size; seeded so every rank agrees."""
    rng = np.random.default_rng(seed)
    if cap is not None and int(cap) < len(idx):
        idx.select(np.sort(rng.choice(len(idx), int(cap), replace=False)), f"cap {cap}")
    if weight is not None and float(weight) != 1.0:
        # every image floor(w) times, plus a random subset for the fractional part
        n, whole = len(idx), int(float(weight))
        extra = rng.choice(n, round((float(weight) - whole) * n), replace=False)
        chosen = np.concatenate([np.tile(np.arange(n), whole), extra])
        idx.select(np.sort(chosen) if len(chosen) else np.arange(min(n, 1)), f"weight {weight}")


STAT_THREADS = 32  # a network filesystem (Lustre, NFS, GPFS) answers many metadata requests at once
STAT_CHUNK = 4096
# A stat answered faster than this came from the page cache or a local disk: there, threads only add GIL
# hand-offs (1.5x slower on the 2-core machine, benchmarks/RESULTS.md), so the rest is checked in one thread.
LOCAL_STAT_S = 50e-6


def _isfile_chunk(paths: np.ndarray) -> list[bool]:
    return [os.path.isfile(p) for p in paths]  # bytes paths: no decoding


def files_exist(paths: np.ndarray, threads: int | None = None) -> np.ndarray:
    """os.path.isfile of every path. The first chunk is timed: when a stat waits on a server, the rest is checked
    by STAT_THREADS threads (stat releases the GIL while it waits); `threads` forces a thread count."""
    head = paths[:STAT_CHUNK]
    start = time.perf_counter()
    found = _isfile_chunk(head)
    rest = paths[len(head):]
    if threads is None:
        local = (time.perf_counter() - start) / max(len(head), 1) < LOCAL_STAT_S
        threads = 1 if local else STAT_THREADS
    if threads <= 1 or not len(rest):
        found += _isfile_chunk(rest)
    else:
        with ThreadPoolExecutor(threads) as pool:
            chunks = [rest[i:i + STAT_CHUNK] for i in range(0, len(rest), STAT_CHUNK)]
            found += itertools.chain.from_iterable(pool.map(_isfile_chunk, chunks))
    return np.array(found, dtype=bool)


def _check_files(idx: SourceIndex, policy: str) -> None:
    exists = files_exist(idx.paths)
    if exists.all():
        return
    missing = [p.decode() for p in idx.paths[~exists]]
    listing = "\n  ".join(missing[:10]) + (f"\n  ... and {len(missing) - 10} more" if len(missing) > 10 else "")
    if policy == "error":
        raise FileNotFoundError(f"{idx.name}: {len(missing)} image(s) listed in the metadata are missing under "
                                f"{idx.root}:\n  {listing}\nFix the download, or pass --bad_files skip to leave "
                                "them out (they are then counted and logged).")
    logger.warning("%s: leaving out %d missing image(s) (--bad_files skip):\n  %s", idx.name, len(missing), listing)
    idx.select(exists, "files present")


def _check_sample_decodes(idx: SourceIndex, count: int, policy: str) -> None:
    """Decode `count` evenly spaced images; report every failure with its path."""
    if count <= 0 or len(idx) == 0:
        return
    picks = np.unique(np.linspace(0, len(idx) - 1, min(count, len(idx))).astype(int))
    problems = [(p, why) for p in (idx.paths[i].decode() for i in picks) if (why := decode_problem(p))]
    if not problems:
        return
    listing = "\n  ".join(f"{p}: {why}" for p, why in problems)
    if policy == "error":
        raise RuntimeError(f"{idx.name}: {len(problems)} of {len(picks)} sampled images could not be decoded:\n  "
                           f"{listing}\nRun tools/verify_data.py to list every bad file, or pass --bad_files skip.")
    logger.warning("%s: %d of %d sampled images could not be decoded (--bad_files skip replaces them):\n  %s",
                   idx.name, len(problems), len(picks), listing)


def open_prepared(args) -> PreparedStore | None:
    return PreparedStore(args.prepared_dir) if args.prepared_dir else None


def _checked_indexes(args: DataConfig, check_files: bool, store: PreparedStore | None) -> list[SourceIndex]:
    """Every source indexed, view-filtered and (check_files) checked on the filesystem: what the index cache holds."""
    views = _pairs(args.views, "--views")
    indexes = []
    for name in args.datasets_names:
        source = SOURCES[name]
        if store is not None:
            idx = store.source_index(name)  # filtered and checked when it was prepared
        else:
            idx = source.index(args)
            _view_filter(idx, source, views.get(name))
        if check_files and store is None:
            _check_files(idx, args.bad_files)
            _check_sample_decodes(idx, args.startup_check, args.bad_files)
        indexes.append(idx)
    return indexes


def _finish(args: DataConfig, indexes: list[SourceIndex]) -> list[SourceIndex]:
    """Caps, weights and the leakage guard: cheap, so they run on every start, from a cache or not."""
    caps, weights = _pairs(args.source_cap, "--source_cap"), _pairs(args.source_weight, "--source_weight")
    for idx in indexes:
        _resample(idx, caps.get(idx.name), weights.get(idx.name), seed=0)
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


def draft_min_side(args) -> int | None:
    """The smallest decode that loses nothing: every RandomResizedCrop (area >= MIN, aspect <= 4/3) still
    downsamples to --input_size. None unless --jpeg_draft."""
    args = data_config(args)
    if not args.jpeg_draft:
        return None
    scale_min = args.random_resize_range[0] if args.random_resize_range else 1.0
    return int(np.ceil(args.input_size * np.sqrt(4 / 3) / np.sqrt(scale_min)))


def count_tree(indexes: list[SourceIndex], origin: str = "built and checked") -> dict:
    """Per source: root, filters with their counts, images, patients, and where this start got the index."""
    return {idx.name: {"root": idx.root, "filters": idx.filters, "images": len(idx),
                       "patients": int(len(np.unique(idx.patients))), "index": origin} for idx in indexes}


def format_count_tree(counts: dict) -> str:
    origins = sorted({c.get("index", "built and checked") for c in counts.values()})
    lines = [f"pre-training pool: {sum(c['images'] for c in counts.values())} images (index {'; '.join(origins)})"]
    for name, c in counts.items():
        lines.append(f"├── {name}: {c['images']} images, {c['patients']} patients ({c['root']})")
        lines.extend(f"│     {why}: {n}" for why, n in c["filters"])
    return "\n".join(lines)


def resolve_norm_stats(args) -> dict:
    """--norm_stats resolved once for every source: what the transforms, the monitor and the checkpoint use."""
    return {"policy": args.norm_stats, "sources": list(args.datasets_names),
            "per_source": {n: norm_stats_for(n, args.norm_stats, args.in_chans) for n in args.datasets_names}}


def _datasets(args, transform, norm_stats: dict, pool: IndexPool | None = None) -> tuple[ConcatSources, dict]:
    problems = check_data_args(args)
    if problems:
        raise ValueError("; ".join(problems))
    if pool is None:
        store = open_prepared(args)
        pool = IndexPool(build_indexes(args, store=store), "built and checked", store)
    # rank 0 opened the store while indexing; ranks that received its index open their own
    store = pool.store if pool.store is not None else open_prepared(args)
    indexes = pool.indexes
    datasets = []
    for source_id, idx in enumerate(indexes):
        source_transform = transform
        if source_transform is None and args.gpu_augment:
            source_transform = CanvasTransform(args.gpu_augment_canvas, source_id)
        elif source_transform is None:
            mean, std = norm_stats["per_source"][idx.name]
            source_transform = build_train_transform(args.input_size, args.random_resize_range, mean, std,
                                                     args.in_chans)
        datasets.append(XrayDataset(idx, source_transform, args.bad_files, draft_min_side(args), store))
    return ConcatSources(datasets), count_tree(indexes, pool.origin)


def build_pretrain_dataset(args_or_names, data_path: str = "data", transform=None, **overrides):
    """The concatenated pre-training dataset and its count tree: the public API for other self-supervised code.

    Pass the parsed training args, or a list of source names plus keyword overrides of any data flag
    (e.g. transform=..., chexpert_root=..., views=["chexpert=AP,PA"]); an unknown keyword is an error that lists
    the valid ones. With transform=None each source gets the reference augmentation and its own mean/std from
    --norm_stats.
    """
    if isinstance(args_or_names, (argparse.Namespace, DataConfig)):
        cfg = data_config(args_or_names, **overrides)
    else:
        cfg = data_config(datasets_names=list(args_or_names), data_path=data_path, **overrides)
    return _datasets(cfg, transform, resolve_norm_stats(cfg))


@dataclass
class PretrainData:
    """Everything the engine takes from the data layer; it never reads a dataset's internals."""

    dataset: ConcatSources
    counts: dict  # the count tree (data_counts.json)
    norm_stats: dict  # resolve_norm_stats: policy, sources, per-source (mean, std)
    augment: BatchAugment | None  # --gpu_augment: crop, flip, normalise on the device, after the batch is moved
    monitor: MonitorBatch | None  # the fixed reconstruction batch (on the main process)
    probe: ProbeSubset | None  # the fixed labelled probe subset (--probe_freq, main process)


def build_pretrain_data(args, monitor: bool = True, probe_images: int = 0,
                        pool: IndexPool | None = None) -> PretrainData:
    """The training pool plus the fixed evaluation images: the monitor batch if `monitor`, a probe subset of
    `probe_images` images if > 0 (both only where asked: rank 0). `pool` is the index if the caller has it
    (build_index_pool, or rank 0's via IndexPool.decode); else it is built here."""
    args = data_config(args)
    norm_stats = resolve_norm_stats(args)
    dataset, counts = _datasets(args, None, norm_stats, pool)
    per_source = norm_stats["per_source"]
    augment = None
    if args.gpu_augment:
        augment = BatchAugment(args.input_size, args.random_resize_range,
                               [per_source[n] for n in args.datasets_names], args.in_chans)
    return PretrainData(
        dataset, counts, norm_stats, augment,
        monitor_batch(dataset, per_source, args.input_size, args.in_chans) if monitor else None,
        probe_subset(dataset, per_source, args.input_size, args.in_chans, probe_images) if probe_images else None)
