"""Segmentation data for main_segment_chestxray.py: three layouts, one split format, and the dataset that serves
(image, mask) pairs with augmentation that moves the mask with the image.

--dataset siim: SIIM-ACR Pneumothorax as released. --data_path holds train-rle.csv (ImageId, EncodedPixels; data/rle.py
reads its run-length convention, several rows of an image are merged, -1 is an empty mask) and the images anywhere
below it: the DICOMs (dicom-images-train/<study>/<series>/<ImageId>.dcm) or PNG conversions (<ImageId>.png). The
DICOMs' PatientID is the patient; PNG conversions carry none, so each image is its own patient (logged).
--dataset folder: image/mask folder pairs (JSRT, Montgomery, Shenzhen lung masks and their PNG releases):
--data_path/--image_dir holds the images and --data_path/--mask_dir the masks, named <image stem><--mask_suffix> with
an image extension. No patient ids: each image is its own patient.
--dataset csv: --train_list/--val_list/--test_list are CSV files with --image_column and --mask_column (paths relative
to --data_path or absolute) and optionally --patient_column.

Masks are binary: a mask file holds 0/1 or 0/255 (anything else is an error naming the file), the size of its image.
For siim and folder without lists, the images are split by patient with --fraction_seed (VAL_FRACTION and
TEST_FRACTION of the patients), and the three lists are written to output_dir as seg_{train,val,test}.csv (columns
image, patient: the ImageId or the image's path below --image_dir), which --train_list/--val_list/--test_list take
back. --label_fraction draws whole training patients, as in classification.
"""
import logging
import os
from dataclasses import dataclass, replace

import numpy as np
import pandas as pd
import torch
from PIL import Image
from torchvision import tv_tensors
from torchvision.transforms import v2

from data import rle
from data.base import BadImageError, find_given_file, require_columns, seeded
from data.checks import files_exist, sample_positions
from data.config import add_image_args
from data.image_io import ImageDecodeError, load_gray
from data.labelled import (
    CHECK_IMAGES,
    CHECK_SAMPLE,
    add_exclude_args,
    add_fraction_args,
    check_disjoint,
    excluded_images,
)
from data.transforms import GrayToNormalizedTensor, check_norm_policy, norm_stats_for

logger = logging.getLogger(__name__)

DATASETS = ("siim", "folder", "csv")
SIIM_CSV = "train-rle.csv"
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".dcm", ".dicom", ".tif", ".tiff", ".bmp", ".gif")
VAL_FRACTION, TEST_FRACTION = 0.1, 0.2  # of the patients, when no lists are given
ROLES = ("train", "val", "test")


def add_data_args(parser) -> None:
    group = parser.add_argument_group("Data")
    group.add_argument("--dataset", default="siim", choices=DATASETS,
                       help="siim: SIIM-ACR Pneumothorax (train-rle.csv with DICOM or PNG images); folder: image and "
                            "mask folders (--image_dir, --mask_dir, --mask_suffix); csv: your CSV lists "
                            "(--image_column, --mask_column) (default: siim)")
    add_image_args(group, "the dataset's folder: siim: the one holding train-rle.csv and the images; folder: the "
                          "one holding --image_dir and --mask_dir; csv: the root of the CSV's relative paths")
    group.add_argument("--image_dir", default="images", help="folder layout: image folder below --data_path "
                       "(default: images)")
    group.add_argument("--mask_dir", default="masks", help="folder layout: mask folder below --data_path "
                       "(default: masks)")
    group.add_argument("--mask_suffix", default="", help="folder layout: the mask of images/X.png is "
                       "masks/X<suffix>.<any image extension>, e.g. _mask (default: none)")
    group.add_argument("--image_column", default="image", help="csv: column of the image paths (default: image)")
    group.add_argument("--mask_column", default="mask", help="csv: column of the mask paths (default: mask)")
    group.add_argument("--patient_column", default=None, help="csv: column of the patient ids (default: none, each "
                       "image its own patient)")
    for role in ROLES:
        group.add_argument(f"--{role}_list", default=None, type=str,
                           help=f"the {role} split: siim/folder: a CSV with an 'image' column (as output_dir/"
                                f"seg_{role}.csv writes it); csv: the split's CSV (default: siim/folder: drawn by "
                                "patient with --fraction_seed; csv: required)")
    add_fraction_args(group, "the split drawn without lists")
    add_exclude_args(group)
    group.add_argument("--check_images", default="sample", choices=CHECK_IMAGES,
                       help=f"decode images and masks at start-up, so a bad file fails before training: 'sample' "
                            f"({CHECK_SAMPLE} evenly spaced per split), 'all', or 'none' (default: sample)")
    group.add_argument("--crop_scale", default=[0.5, 1.0], type=float, nargs=2, metavar=("MIN", "MAX"),
                       help="training crop: RandomResizedCrop's area range, applied to image and mask "
                            "(default: 0.5 1.0)")
    group.add_argument("--hflip_prob", default=0.5, type=float,
                       help="training: probability of a horizontal flip of image and mask (default: 0.5)")


def check_data_args(args) -> list[str]:
    problems = []
    problem = check_norm_policy(args.norm_stats)
    if problem:
        problems.append(problem)
    given = [role for role in ROLES if getattr(args, f"{role}_list")]
    if args.dataset == "csv" and len(given) < 3:
        problems.append("--dataset csv needs --train_list, --val_list and --test_list (CSV files with "
                        f"{args.image_column!r} and {args.mask_column!r} columns)")
    elif given and len(given) < 3:
        problems.append(f"--{given[0]}_list given alone: give all three of --train_list/--val_list/--test_list, or "
                        "none to draw the split by patient")
    if not 0.0 < args.label_fraction <= 1.0:
        problems.append(f"--label_fraction is a share of the training list in (0, 1], got {args.label_fraction}")
    low, high = args.crop_scale
    if not 0.0 < low <= high <= 1.0:
        problems.append(f"--crop_scale {low:g} {high:g}: need 0 < MIN <= MAX <= 1")
    if not 0.0 <= args.hflip_prob <= 1.0:
        problems.append(f"--hflip_prob must be in [0, 1], got {args.hflip_prob}")
    return problems


@dataclass
class SegSplit:
    """One split: per image its name (the row key of the split file), path, mask (a mask file's path, or the tuple
    of its SIIM EncodedPixels rows) and patient."""

    role: str
    source: str
    names: list
    paths: np.ndarray  # bytes
    masks: list
    patients: np.ndarray  # bytes
    excluded: np.ndarray | None = None  # test images named by --exclude_list (bool mask), kept out of the results

    def __len__(self) -> int:
        return len(self.paths)

    def subset(self, keep: np.ndarray, source: str) -> "SegSplit":
        picks = np.flatnonzero(keep)
        return replace(self, source=source, names=[self.names[i] for i in picks], paths=self.paths[picks],
                       masks=[self.masks[i] for i in picks], patients=self.patients[picks],
                       excluded=None if self.excluded is None else self.excluded[picks])

    def write(self, path: str) -> None:
        """image, patient: what --{role}_list takes back (siim and folder layouts)."""
        pd.DataFrame({"image": self.names, "patient": [p.decode() for p in self.patients]}).to_csv(
            path + ".tmp", index=False)
        os.replace(path + ".tmp", path)


# ---- the three layouts: every image of the dataset as (name, path, mask, patient) --------------------------------

def _walk_images(root: str) -> dict[str, str]:
    """{file stem: path} of every image below root (one walk; DICOM preferred over another file of the stem)."""
    found = {}
    for folder, _, files in os.walk(root):
        for name in files:
            stem, ext = os.path.splitext(name)
            if ext.lower() in IMAGE_EXTENSIONS and (stem not in found or ext.lower() in (".dcm", ".dicom")):
                found[stem] = os.path.join(folder, name)
    return found


def dicom_patient(path: str) -> str | None:
    import pydicom

    value = pydicom.dcmread(path, stop_before_pixels=True, force=True, specific_tags=["PatientID"]).get("PatientID")
    return (str(value).strip() or None) if value is not None else None


def siim_images(data_path: str) -> tuple[list, list, list, list]:
    """(ImageIds, paths, EncodedPixels rows, patients) of train-rle.csv, rows of an image merged, in file order."""
    csv = os.path.join(data_path, SIIM_CSV)
    if not os.path.isfile(csv):
        raise FileNotFoundError(f"--dataset siim: {csv} not found; --data_path must hold SIIM-ACR's {SIIM_CSV} and "
                                "the images (dicom-images-train/ or PNG conversions)")
    df = pd.read_csv(csv, dtype=str, keep_default_na=False, encoding="utf-8-sig")
    df.columns = [c.strip() for c in df.columns]  # the release's header is "ImageId, EncodedPixels"
    require_columns(df, ["ImageId", "EncodedPixels"], csv)
    rows: dict[str, list[str]] = {}
    for image_id, encoded in zip(df["ImageId"].str.strip(), df["EncodedPixels"]):
        rows.setdefault(image_id, []).append(encoded.strip())
    files = _walk_images(data_path)
    missing = [i for i in rows if i not in files]
    if missing:
        raise FileNotFoundError(f"{csv}: {len(missing)} ImageId(s) have no image below {data_path} (looked for "
                                f"<ImageId>.dcm or .png), e.g. {missing[:3]}; check --data_path and the download")
    ids = list(rows)
    paths = [files[i] for i in ids]
    patients = [(dicom_patient(p) if p.lower().endswith((".dcm", ".dicom")) else None) or i
                for i, p in zip(ids, paths)]
    without = sum(p == i for p, i in zip(patients, ids))
    if without:
        logger.info("siim: %d of %d images carry no PatientID (PNG conversions): each is its own patient", without,
                    len(ids))
    return ids, paths, [tuple(rows[i]) for i in ids], patients


def folder_images(args) -> tuple[list, list, list, list]:
    """(image paths below --image_dir, paths, mask paths, patients = the names) of the folder layout."""
    image_root = os.path.join(args.data_path, args.image_dir)
    mask_root = os.path.join(args.data_path, args.mask_dir)
    for flag, root in (("--image_dir", image_root), ("--mask_dir", mask_root)):
        if not os.path.isdir(root):
            raise FileNotFoundError(f"{flag}: {root} is not a folder (--dataset folder reads images from "
                                    "--data_path/--image_dir and masks from --data_path/--mask_dir)")
    images = {os.path.relpath(p, image_root): p for p in _walk_images(image_root).values()}
    masks = {}
    for path in _walk_images(mask_root).values():
        rel = os.path.splitext(os.path.relpath(path, mask_root))[0]
        masks[rel] = path
    names = sorted(images)
    mask_paths, lacking = [], []
    for name in names:
        found = masks.get(os.path.splitext(name)[0] + args.mask_suffix)
        mask_paths.append(found)
        if found is None:
            lacking.append(name)
    if lacking:
        raise FileNotFoundError(f"{len(lacking)} image(s) of {image_root} have no mask in {mask_root} named "
                                f"<stem>{args.mask_suffix}.<ext>, e.g. {lacking[:3]}; check --mask_dir and "
                                "--mask_suffix")
    return names, [images[n] for n in names], mask_paths, list(names)


def csv_split(role: str, args) -> SegSplit:
    flag = f"--{role}_list"
    path = getattr(args, f"{role}_list")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{flag} {path} not found")
    df = pd.read_csv(path, dtype=str, keep_default_na=False, encoding="utf-8-sig")
    require_columns(df, [args.image_column, args.mask_column, *([args.patient_column] if args.patient_column
                                                                else [])], path)

    def absolute(values):
        return [v if os.path.isabs(v) else os.path.join(args.data_path, v) for v in values.str.strip()]

    names = df[args.image_column].str.strip().tolist()
    patients = df[args.patient_column].str.strip().tolist() if args.patient_column else names
    return SegSplit(role, path, names, np.array(absolute(df[args.image_column]), dtype=np.bytes_),
                    absolute(df[args.mask_column]), np.array(patients, dtype=np.bytes_))


def patient_roles(patients: np.ndarray, seed: int) -> np.ndarray:
    """'train'/'val'/'test' per image: whole patients drawn with `seed`, VAL_FRACTION and TEST_FRACTION of them."""
    unique, inverse = np.unique(patients, return_inverse=True)
    order = np.random.default_rng(seed).permutation(len(unique))
    n_test, n_val = round(TEST_FRACTION * len(unique)), round(VAL_FRACTION * len(unique))
    roles = np.full(len(unique), "train", dtype=object)
    roles[order[:n_test]] = "test"
    roles[order[n_test:n_test + n_val]] = "val"
    return roles[inverse]


def _given_split(role: str, args, everything: SegSplit) -> SegSplit:
    """A given siim/folder list: a CSV whose 'image' column names images of the dataset."""
    flag = f"--{role}_list"
    path = find_given_file(getattr(args, f"{role}_list"), flag, args.data_path)
    df = pd.read_csv(path, dtype=str, keep_default_na=False, encoding="utf-8-sig")
    require_columns(df, ["image"], path)
    position = {n: i for i, n in enumerate(everything.names)}
    wanted = df["image"].str.strip().tolist()
    unknown = [n for n in wanted if n not in position]
    if unknown:
        raise ValueError(f"{flag} {path}: {len(unknown)} image(s) are not in the dataset under {args.data_path}, "
                         f"e.g. {unknown[:3]}; a list names images as output_dir/seg_{role}.csv writes them")
    keep = np.zeros(len(everything), dtype=bool)
    picks = [position[n] for n in wanted]
    keep[picks] = True
    if len(set(picks)) < len(picks):
        twice = sorted({n for n in wanted if wanted.count(n) > 1})
        raise ValueError(f"{flag} {path} lists {len(twice)} image(s) more than once, e.g. {twice[:3]}")
    return replace(everything.subset(keep, path), role=role)


def build_splits(args) -> tuple[dict[str, SegSplit], bool]:
    """(train/val/test, whether they were drawn here and are to be written to output_dir), checked: no empty split,
    every image and mask file present, no image twice, no patient in two splits, a sample of images and masks
    decoding as masks of their image's size."""
    if args.dataset == "csv":
        splits, drawn = {role: csv_split(role, args) for role in ROLES}, False
    else:
        names, paths, masks, patients = (siim_images(args.data_path) if args.dataset == "siim"
                                         else folder_images(args))
        everything = SegSplit("all", args.data_path, names, np.array(paths, dtype=np.bytes_), masks,
                              np.array(patients, dtype=np.bytes_))
        drawn = not args.train_list
        if drawn:
            roles = patient_roles(everything.patients, args.fraction_seed)
            splits = {role: replace(everything.subset(roles == role, f"seg_{role}.csv (drawn with --fraction_seed "
                                                      f"{args.fraction_seed})"), role=role) for role in ROLES}
        else:
            splits = {role: _given_split(role, args, everything) for role in ROLES}
    for split in splits.values():
        if not len(split):
            raise ValueError(f"the {split.role} split ({split.source}) holds no image; with fewer than ~10 patients "
                             "draw the split yourself and pass --train_list/--val_list/--test_list")
        if len(set(split.paths.tolist())) < len(split):
            raise ValueError(f"the {split.role} list {split.source} names an image more than once")
        files = [*split.paths, *(np.array([m for m in split.masks if isinstance(m, str)], dtype=np.bytes_))]
        exists = files_exist(np.array(files, dtype=np.bytes_))
        if not exists.all():
            missing = [f.decode() for f, ok in zip(files, exists) if not ok]
            raise FileNotFoundError(f"{len(missing)} image or mask file(s) of the {split.role} list {split.source} "
                                    "are missing:\n  " + "\n  ".join(missing[:10]))
    check_disjoint(splits)
    for split in splits.values():
        check_decodes(split, args.check_images)
    if args.exclude_list:
        splits["test"].excluded = excluded_images(splits["test"], args.exclude_list)
    return splits, drawn


def check_decodes(split: SegSplit, policy: str) -> None:
    """--check_images: decode a sample (or all) of a split's images and their masks now, naming each bad file."""
    if policy == "none":
        return
    bad = []
    for i in sample_positions(len(split), None if policy == "all" else CHECK_SAMPLE):
        try:
            load_pair(split, int(i))  # decodes the image, then its mask against the image's size
        except (BadImageError, ImageDecodeError, rle.RLEError, ValueError) as e:
            bad.append((split.paths[i].decode(), str(e)))
    if bad:
        listing = "\n  ".join(f"{p}: {why}" for p, why in bad[:10])
        raise ValueError(f"{len(bad)} checked image(s) or mask(s) of the {split.role} list {split.source} are "
                         f"bad:\n  {listing}\nFix or remove them (--check_images all checks every pair)")


# ---- images and masks ---------------------------------------------------------------------------------------------

def read_mask_file(path: str, size: tuple[int, int], image_path: str) -> np.ndarray:
    """A binary mask file -> bool [H, W]: 0/1 or 0/255 values, the size (W, H) of its image."""
    try:
        with Image.open(path) as im:
            im.load()
            if im.mode not in ("1", "L", "P", "I", "I;16", "I;16B", "I;16L"):
                raise BadImageError(f"mask {path}: mode {im.mode}; a mask is one channel of 0/1 or 0/255")
            values = np.asarray(im)
            mask_size = im.size
    except FileNotFoundError as e:
        raise BadImageError(f"mask {path} is missing") from e
    except OSError as e:
        raise BadImageError(f"mask {path} does not decode: {e}") from e
    if mask_size != size:
        raise BadImageError(f"mask {path} is {mask_size[0]}x{mask_size[1]} but its image {image_path} is "
                            f"{size[0]}x{size[1]}; masks must have their image's size")
    found = np.unique(values)
    if not (set(found.tolist()) <= {0, 1} or set(found.tolist()) <= {0, 255}):
        raise BadImageError(f"mask {path} holds the values {found[:8].tolist()}; a binary mask holds 0/1 or 0/255 "
                            "(a soft or anti-aliased mask must be thresholded first)")
    return values > 0


def load_pair(split: SegSplit, i: int) -> tuple[Image.Image, np.ndarray]:
    """(8-bit gray image, bool mask of its size) of a split's i-th image."""
    path = split.paths[i].decode()
    try:
        image = load_gray(path)
    except (ImageDecodeError, FileNotFoundError) as e:
        raise BadImageError(f"the {split.role} list {split.source}: {e}") from e
    mask = split.masks[i]
    if isinstance(mask, tuple):
        try:
            return image, rle.decode_rows(list(mask), image.height, image.width)
        except rle.RLEError as e:
            raise BadImageError(f"{SIIM_CSV}, ImageId {split.names[i]}: {e}") from e
    return image, read_mask_file(mask, image.size, path)


class PairTransform:
    """(gray PIL image, bool mask) -> (normalised [C, s, s] float, [1, s, s] float 0/1). torchvision's v2 transforms
    move the mask with the image; a tv_tensors.Mask is resized with nearest neighbour, so it stays binary."""

    def __init__(self, input_size: int, mean, std, in_chans: int, is_train: bool, crop_scale=(0.5, 1.0),
                 hflip_prob: float = 0.5):
        size = (input_size, input_size)
        self.geometry = v2.Compose([v2.RandomResizedCrop(size, scale=tuple(crop_scale), antialias=True),
                                    v2.RandomHorizontalFlip(hflip_prob)]) if is_train else v2.Resize(size,
                                                                                                      antialias=True)
        self.normalize = GrayToNormalizedTensor(mean, std, in_chans)

    def __call__(self, image: Image.Image, mask: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        pixels = tv_tensors.Image(torch.from_numpy(np.asarray(image, dtype=np.uint8).copy()).unsqueeze(0))
        target = tv_tensors.Mask(torch.from_numpy(mask.astype(np.uint8)).unsqueeze(0))
        pixels, target = self.geometry(pixels, target)
        return self.normalize(pixels[0].numpy()), target.float()


def build_transform(args, is_train: bool) -> PairTransform:
    mean, std = norm_stats_for(args.dataset, args.norm_stats, args.in_chans)
    return PairTransform(args.input_size, mean, std, args.in_chans, is_train, args.crop_scale, args.hflip_prob)


class SegmentationDataset(torch.utils.data.Dataset):
    """(image [C, s, s], mask [1, s, s], position) per item; the training sampler's (index, seed) pairs seed each
    sample's augmentation, so a resumed epoch augments as the interrupted one did."""

    def __init__(self, split: SegSplit, transform: PairTransform):
        self.split, self.transform = split, transform

    def __len__(self) -> int:
        return len(self.split)

    def __getitem__(self, item):
        i, seed = item if isinstance(item, tuple) else (item, None)
        image, mask = load_pair(self.split, i)
        if seed is None:
            return (*self.transform(image, mask), i)
        with seeded(seed):
            return (*self.transform(image, mask), i)
