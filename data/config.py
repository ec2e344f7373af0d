"""The data flags (add_data_args) and the DataConfig built from them: what every source and builder in data/ reads.

SOURCES is the registry of pre-training sources, flag value -> Source; each source adds its own flags.
"""
import argparse
import copy
import dataclasses

from data.base import BAD_FILE_POLICIES, Source
from data.chestxray_nih import ChestXrayNIH
from data.chexpert import CheXpert
from data.folder import Folder
from data.mimic_cxr import MimicCXR
from data.padchest import PadChest
from data.transforms import check_norm_policy
from data.vindr_cxr import VinDrCXR
from util.args import add_bool_flag

SOURCES: dict[str, Source] = {s.name: s for s in (CheXpert(), ChestXrayNIH(), MimicCXR(), PadChest(), VinDrCXR(),
                                                  Folder())}


def add_image_args(group, data_path_help: str) -> None:
    """--data_path, --input_size, --in_chans and --norm_stats: the data flags of every training script (pre-training
    here, fine-tuning in data/labelled.py), declared once; only --data_path's meaning differs by script."""
    group.add_argument("--data_path", default="data", type=str, help=f"{data_path_help} (default: data)")
    group.add_argument("--input_size", default=224, type=int, help="image size in pixels (default: 224)")
    group.add_argument("--in_chans", default=3, type=int, choices=[1, 3],
                       help="model input channels: 3 repeats the gray plane (the reference), 1 is native grayscale "
                            "(default: 3)")
    group.add_argument("--norm_stats", default="dataset", type=str,
                       help="normalisation: 'dataset' (the reference's per-dataset mean/std), 'imagenet', 'cxr' "
                            "(0.5056/0.252), 'MEAN,STD', or a JSON file from tools/compute_norm_stats.py "
                            "(default: dataset)")


def add_data_args(parser: argparse.ArgumentParser, training: bool = True) -> None:
    """The Data group: what the sources are and where (every script and data tool), and with `training` how the
    training pipeline reads them (augmentation, prepared data, decoding, start-up checks, the index cache)."""
    g = parser.add_argument_group("Data")
    add_image_args(g, "root holding the datasets in the reference layout: CheXpert-v1.0-small/, nih_chestxray/, "
                      "mimic_cxr/")
    g.add_argument("--datasets_names", nargs="+", default=["chexpert", "chestxray_nih"],
                   help=f"sources to pre-train on, any of {list(SOURCES)} (default: chexpert chestxray_nih)")
    for name, source in SOURCES.items():
        g.add_argument(f"--{name}_root", default=None, type=str,
                       help=f"folder of {name}, overriding --data_path/{source.default_dir}")
        source.add_args(g)
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
    add_bool_flag(g, "leakage_check", True, "fail if a pre-training patient is in a source's own test/validation split")
    if training:  # how training reads the data; the data tools index and check it without these
        g.add_argument("--rebuild_index", action="store_true",
                       help="index and check every image again even if output_dir/index_cache.npz is valid (it is "
                            "rebuilt anyway when a metadata file, list, image folder or data flag changes)")
        g.add_argument("--random_resize_range", type=float, nargs=2, default=None, metavar=("MIN", "MAX"),
                       help="RandomResizedCrop scale range, e.g. 0.5 1.0; unset means a plain resize "
                            "(default: unset)")
        g.add_argument("--prepared_dir", default=None, type=str,
                       help="train from a folder written by tools/prepare_data.py instead of the original files "
                            "(same images, same order; default: off)")
        add_bool_flag(g, "jpeg_draft", False,
                      "decode JPEGs at 1/2, 1/4 or 1/8 scale (libjpeg DCT scaling) when the crop does not need full "
                      "resolution; about 1.5x the full-size pipeline on full-resolution quality-95 JPEGs, where "
                      "entropy decoding dominates (benchmarks/RESULTS.md)")
        add_bool_flag(g, "gpu_augment", False,
                      "run crop, resize, flip and normalise on the training device as one batched operation; the "
                      "workers only place the decoded image on a fixed canvas")
        g.add_argument("--gpu_augment_canvas", default=416, type=int,
                       help="canvas side for --gpu_augment; larger images are shrunk to fit (default: 416, for data "
                            "prepared at 320)")
        g.add_argument("--startup_check", default=16, type=int,
                       help="decode this many images of each source at start-up, so unreadable files fail before "
                            "training (default: 16; tools/verify_data.py checks every file)")


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


def parse_pairs(items: list[str], flag: str) -> dict[str, str]:
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
            values = parse_pairs(getattr(args, flag), f"--{flag}")
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
