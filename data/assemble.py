"""The pre-training dataset assembled from the checked index: one XrayDataset per source with its transform and
mean/std, concatenated, plus the fixed monitor batch and probe subset (PretrainData, what pre-training takes)."""
import argparse
from dataclasses import dataclass

import numpy as np

from data.base import ConcatSources, SourceIndex, XrayDataset
from data.config import DataConfig, check_data_args, data_config
from data.gpu_augment import BatchAugment, CanvasTransform
from data.monitor import MonitorBatch, ProbeSubset, monitor_batch, probe_subset
from data.pool import IndexPool, build_indexes, open_prepared
from data.transforms import build_train_transform, norm_stats_for


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
