"""The interface every source implements, and the dataset that turns an index into tensors.

A source only indexes: it reads metadata once and returns plain numpy arrays (path, patient,
view), so no DataFrame is carried into __getitem__ or copied into every worker.
"""
import contextlib
import logging
import os
import random
from dataclasses import dataclass, field

import numpy as np
import torch
from torch.utils.data import Dataset

from data.image_io import ImageDecodeError, load_gray

logger = logging.getLogger(__name__)

BAD_FILE_POLICIES = ("error", "skip")
MONITOR_IMAGES = 8  # held-out images a source offers for reconstruction monitoring (never trained on)


class BadImageError(RuntimeError):
    """An image failed to load during training under --bad_files error; the message names the file."""


def as_bytes(values) -> np.ndarray:
    """Strings as a fixed-width bytes array (UTF-8): no Python object per element, so nothing for a DataLoader
    worker's reference counting to copy."""
    array = np.asarray(values)
    if array.dtype.kind == "S":
        return array
    try:
        return array.astype(np.bytes_)  # the common all-ASCII case, 3x faster than encoding
    except UnicodeEncodeError:
        return np.strings.encode(array.astype(str), "utf-8")


@dataclass
class SourceIndex:
    """What a source selected for pre-training, plus what the leakage guard needs."""

    name: str
    root: str
    paths: np.ndarray  # bytes, one per image
    patients: np.ndarray  # bytes, one per image
    views: np.ndarray  # bytes, one per image ('' when the source has no view column)
    held_out_patients: set = field(default_factory=set)  # patients of the source's own test/validation splits
    held_out_name: str = ""
    filters: list = field(default_factory=list)  # (description, count after) for the start-up tree
    rows: np.ndarray | None = None  # positions in a prepared store (data/prepared.py), when reading from one
    monitor_paths: list = field(default_factory=list)  # a few held-out-split images for reconstruction monitoring
    labels: np.ndarray | None = None  # [N, K] 0/1 findings, for the optional linear probe (--probe_freq)

    def __post_init__(self):
        self.paths, self.patients, self.views = as_bytes(self.paths), as_bytes(self.patients), as_bytes(self.views)
        if not (len(self.paths) == len(self.patients) == len(self.views)):
            raise ValueError(f"{self.name}: index arrays differ in length")

    def __len__(self) -> int:
        return len(self.paths)

    def select(self, keep: np.ndarray, why: str) -> "SourceIndex":
        self.paths, self.patients, self.views = self.paths[keep], self.patients[keep], self.views[keep]
        if self.rows is not None:
            self.rows = self.rows[keep]
        if self.labels is not None:
            self.labels = self.labels[keep]
        self.filters.append((why, len(self.paths)))
        return self


class Source:
    """One chest X-ray collection: everything a source may offer is declared here.

    A subclass sets `name` (its --datasets_names value) and `default_dir`, implements `index`, and may set
    `default_views` and add flags of its own in `add_args` (every source gets --<name>_root). Beyond the pool, its
    SourceIndex may carry held_out_patients (for the leakage guard), monitor_paths (held-out images for the
    reconstruction monitor) and labels (findings, for the probe).
    """

    name = ""
    default_dir = ""  # folder under --data_path in the reference layout
    # views kept unless --views says otherwise: () keeps all, ("frontal",) drops laterals
    default_views: tuple[str, ...] = ()

    @classmethod
    def add_args(cls, group) -> None:
        """Flags of this source alone, added to the Data group."""

    def inputs(self, args) -> list[str]:
        """The files and folders `index` reads (metadata, lists, the folders it lists): their size and modification
        time key the index cache (data/index_cache.py), so a change to any of them rebuilds the index. A folder's
        mtime changes when a file is added, removed or renamed in it."""
        return [self.resolve_root(args)]

    def resolve_root(self, args) -> str:
        root = getattr(args, f"{self.name}_root") or os.path.join(args.data_path, self.default_dir)
        if not os.path.isdir(root):
            raise FileNotFoundError(
                f"{self.name}: data folder {root} does not exist. Put the dataset at "
                f"{os.path.join(args.data_path, self.default_dir)} (the reference layout under --data_path) "
                f"or pass --{self.name}_root. PRETRAIN.md lists the expected files."
            )
        return root

    def index(self, args) -> SourceIndex:
        raise NotImplementedError


def require_file(path: str, source: str, what: str) -> str:
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{source}: {what} not found at {path}")
    return path


def find_given_file(given: str, flag: str, *folders: str) -> str:
    """A file named on the command line: as given (absolute, or relative to the working directory), else relative
    to each of `folders` in turn; the error names the flag and every place looked in."""
    for candidate in (given, *(os.path.join(folder, given) for folder in folders)):
        if os.path.isfile(candidate):
            return candidate
    places = ["the working directory", *folders]
    raise FileNotFoundError(f"{flag} {given} not found (looked in {', in '.join(places[:-1])} and in {places[-1]})")


def require_columns(df, columns, path: str) -> None:
    missing = [c for c in columns if c not in df.columns]
    if missing:
        raise ValueError(f"{path} lacks the column(s) {missing}; found {list(df.columns)[:15]}. "
                         "Is this the right metadata file for this source?")


class XrayDataset(Dataset):
    """Decode one source's images and apply a transform. Returns (image, replaced) pairs.

    `replaced` is 1 when the file failed to decode and --bad_files skip put another image in its
    place; the engine sums it so the count is logged, never silent.
    """

    def __init__(self, index: SourceIndex, transform, bad_files: str = "error", min_side: int | None = None,
                 store=None):
        if bad_files not in BAD_FILE_POLICIES:
            raise ValueError(f"--bad_files must be one of {list(BAD_FILE_POLICIES)}, got '{bad_files}'")
        self.name = index.name
        self.paths = index.paths
        self.transform = transform
        self.bad_files = bad_files
        self.min_side = min_side
        self.store, self.rows = store, index.rows
        self.monitor_paths = list(index.monitor_paths)
        self.patients, self.labels = index.patients, index.labels

    def __len__(self) -> int:
        return len(self.paths)

    def load(self, i: int):
        if self.store is not None:
            return self.store.image(int(self.rows[i]))
        return load_gray(self.paths[i].decode(), self.min_side)

    def decode(self, i: int):
        """(image, replaced) under the --bad_files policy."""
        for attempt in range(len(self.paths)):
            j = (i + attempt) % len(self.paths)
            try:
                return self.load(j), int(attempt > 0)
            except (ImageDecodeError, FileNotFoundError) as e:
                if self.bad_files == "error":
                    raise BadImageError(f"{self.name}: {e}. Run tools/verify_data.py to list every bad file, "
                                       "or pass --bad_files skip to replace and count them.") from e
                logger.warning("%s: skipped bad file (%s); using the next image instead", self.name, e)
        raise RuntimeError(f"{self.name}: no image of this source could be decoded")

    def __getitem__(self, item):
        i, seed = item if isinstance(item, tuple) else (item, None)
        image, replaced = self.decode(i)
        if seed is None:
            return self.transform(image), replaced
        with seeded(seed):  # the augmentation is independent of worker assignment and resume point
            return self.transform(image), replaced


@contextlib.contextmanager
def seeded(seed: int):
    """One sample's augmentation, seeded: torch's CPU generator (torchvision), Python's `random` (timm's RandAugment
    magnitudes, its crops) and NumPy's global generator (RandAugment's choice of operations) take `seed`, and all
    three are restored afterwards. The CUDA generators are left alone: torch.manual_seed would reseed them too, which
    with --num_workers 0 (augmentation in the training process) would clobber the training's CUDA stream."""
    python_state, numpy_state = random.getstate(), np.random.get_state()
    try:
        with torch.random.fork_rng(devices=[]):
            torch.default_generator.manual_seed(seed)
            random.seed(seed)
            np.random.seed(seed % 2**32)
            yield
    finally:
        random.setstate(python_state)
        np.random.set_state(numpy_state)


class ConcatSources(torch.utils.data.ConcatDataset):
    """ConcatDataset that forwards (index, seed) items to the right source."""

    def __getitem__(self, item):
        i, seed = item if isinstance(item, tuple) else (item, None)
        if i < 0:
            i += len(self)
        source = int(np.searchsorted(self.cumulative_sizes, i, side="right"))
        offset = i - (self.cumulative_sizes[source - 1] if source else 0)
        return self.datasets[source][(offset, seed) if seed is not None else offset]
