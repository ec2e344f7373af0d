"""Multi-source chest X-ray pre-training data: a registry of sources and one builder.

Public API, also for other self-supervised code (the paper's MoCo v2 baselines used this loader):

    from data import build_pretrain_dataset
    dataset, counts = build_pretrain_dataset(["chexpert", "chestxray_nih"], data_path="data",
                                             transform=TwoCropsTransform(...))

Each item is (transform(gray PIL image), replaced_flag). The modules, one concern each:
    config.py    the flags (add_data_args), DataConfig, SOURCES, their checks
    filters.py   views, caps and weights
    checks.py    files present, a sample decodes
    pool.py      the checked index of every source, the index cache, the leakage guard
    assemble.py  datasets, transforms, the monitor batch and probe subset
"""
from data.assemble import (
    PretrainData,
    build_pretrain_data,
    build_pretrain_dataset,
    count_tree,
    draft_min_side,
    format_count_tree,
    resolve_norm_stats,
)
from data.base import BadImageError
from data.checks import STAT_CHUNK, files_exist
from data.config import DATA_FIELDS, SOURCES, DataConfig, add_data_args, check_data_args, data_config
from data.leakage import DataLeakageError
from data.pool import IndexPool, build_index_pool, build_indexes

__all__ = ["DATA_FIELDS", "SOURCES", "STAT_CHUNK", "BadImageError", "DataConfig", "DataLeakageError", "IndexPool",
           "PretrainData", "add_data_args", "build_index_pool", "build_indexes", "build_pretrain_data",
           "build_pretrain_dataset", "check_data_args", "count_tree", "data_config", "draft_min_side", "files_exist",
           "format_count_tree", "resolve_norm_stats"]
