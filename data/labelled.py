"""Labelled splits for fine-tuning and linear probing, and the dataset that serves them.

NIH ChestX-ray14 (--dataset chestxray, the reference's default): --train_list/--val_list/--test_list in the
reference format, "name label x14" per line, findings in chestxray_nih.FINDINGS order. Default: the official
lists shipped in data_splits/chestxray/ (75,312 / 11,212 / 25,596 images, patient-disjoint). Images are found
under --data_path in any NIH layout (images/, images_*/images/, flat), or under --data_path/nih_chestxray/.

CheXpert (--dataset chexpert): the 5 competition findings, from train.csv (training), a patient-held-out part of
train.csv (validation, --val_list to give one) and valid.csv (the radiologist-labelled set, scored once as test).
Uncertain labels (-1.0) follow --chexpert_uncertain per finding; blank cells are negative.

COVIDx (--dataset covidx, single-label) is described in data/covidx.py, NODE21 (--dataset node21, two logits or one)
in data/node21.py; your own CSV files (--dataset csv) with the flags of that group.

At start-up every file of the three splits is checked to exist, no list may name an image twice, every label of the
three lists is checked (the test list's too), and the splits are checked to share no patient. The test labels are
kept and its images decoded only once, after training (load_labels).
"""
import logging
import math
import os
from dataclasses import dataclass, replace

import numpy as np
import pandas as pd
import torch

from data import chestxray_nih as nih
from data import chexpert, covidx, node21
from data.base import SourceIndex, XrayDataset, find_given_file, require_columns, seeded
from data.checks import files_exist, undecodable
from data.config import add_image_args
from data.transforms import build_finetune_transform, check_norm_policy, norm_stats_for
from util.errors import SetupError

logger = logging.getLogger(__name__)

DATASETS = ("chestxray", "chexpert", "covidx", "node21", "csv")
# per-dataset mean/std (data/transforms.py; a dataset not in its table takes the chest X-ray values)
SOURCE_OF = {"chestxray": "chestxray_nih", "chexpert": "chexpert", "covidx": "covidx", "node21": "node21", "csv": "csv"}
# the reference's order (its CheXpert dataset's columns), so a CheXpert head moves between the two codebases
CHEXPERT_FINDINGS = ["Cardiomegaly", "Edema", "Consolidation", "Atelectasis", "Pleural Effusion"]
# the CheXpert paper's best policy per finding: U-Ones for Atelectasis and Edema, U-Zeros for the others
DEFAULT_UNCERTAIN = "Atelectasis=ones,Edema=ones,Cardiomegaly=zeros,Consolidation=zeros,Pleural Effusion=zeros"
UNCERTAIN_POLICIES = ("ones", "zeros")
CHEXPERT_VAL_FRACTION = 0.05  # of train.csv's patients, when no --val_list is given
CHECK_IMAGES = ("sample", "all", "none")
CHECK_SAMPLE = 16  # images decoded per split at start-up under --check_images sample


def add_data_args(parser) -> None:
    group = parser.add_argument_group("Data")
    group.add_argument("--dataset", default="chestxray", choices=DATASETS,
                       help="chestxray: NIH ChestX-ray14, 14 findings; chexpert: CheXpert, 5 competition findings; "
                            "covidx: COVIDx, 4 classes, single-label; node21: NODE21, a nodule or not (--nb_classes "
                            "2 or 1); csv: your own CSV files (--path_column and "
                            "--label_columns or --label_column) (default: chestxray)")
    add_image_args(group, "the dataset's folder (NIH: images/ or images_*/images/ inside, or a folder holding "
                          "nih_chestxray/; CheXpert: the folder of train.csv, or one holding CheXpert-v1.0-small/)")
    group.add_argument("--train_list", default=None, type=str,
                       help="NIH: 'name label x14' list (default: data_splits/chestxray/train_official.txt); "
                            "CheXpert: a CSV (default: train.csv)")
    group.add_argument("--val_list", default=None, type=str,
                       help="validation list, the only one that selects the checkpoint (default: NIH "
                            f"val_official.txt; CheXpert {CHEXPERT_VAL_FRACTION * 100:g}%% of train.csv's patients)")
    group.add_argument("--test_list", default=None, type=str,
                       help="test list, scored once at the end (default: NIH test_official.txt; CheXpert valid.csv)")
    add_fraction_args(group, "CheXpert's validation patients")
    add_exclude_args(group)
    group.add_argument("--check_images", default="sample", choices=CHECK_IMAGES,
                       help="decode images of every split at start-up, so a bad file fails before training: 'sample' "
                            f"({CHECK_SAMPLE} evenly spaced per split), 'all', or 'none' (default: sample; "
                            "tools/verify_data.py checks every file)")
    csv = parser.add_argument_group("Your own data (--dataset csv)")
    csv.add_argument("--path_column", default="path", type=str,
                     help="column of the image paths, relative to --data_path or absolute; any image pre-training "
                          "reads: PNG, JPEG, 16-bit PNG, DICOM (default: path)")
    csv.add_argument("--label_columns", default=None, type=str, metavar="A,B,...",
                     help="multi-label: these 0/1 columns, one logit each, BCE and AUROC (default: none)")
    csv.add_argument("--label_column", default=None, type=str, metavar="C",
                     help="single-label: this column holds one class per image, cross-entropy and accuracy; "
                          "--classes gives the classes in the order of the logits (default: none)")
    csv.add_argument("--classes", default=None, type=str, metavar="A,B,...",
                     help="with --label_column: every class, in the order of the logits (default: none)")
    csv.add_argument("--patient_column", default=None, type=str,
                     help="column of the patient ids, for the bootstrap and the check that no patient is in two "
                          "splits (default: none, each image its own patient)")
    group.add_argument("--chexpert_uncertain", default=DEFAULT_UNCERTAIN, type=str,
                       help="CheXpert uncertain (-1) labels: 'ones', 'zeros' or per finding 'Edema=ones,...' "
                            "(default: U-Ones for Atelectasis and Edema, U-Zeros for the rest)")


def add_fraction_args(group, also_seeds: str) -> None:
    """--label_fraction and --fraction_seed (classification and segmentation); `also_seeds`: what else the seed
    draws."""
    group.add_argument("--label_fraction", default=1.0, type=float,
                       help="train on this share of the training list, whole patients drawn with --fraction_seed; "
                            "the drawn list is written to output_dir (default: 1.0)")
    group.add_argument("--fraction_seed", default=0, type=int,
                       help=f"seed of the --label_fraction draw and of {also_seeds} (default: 0)")


def add_exclude_args(group) -> None:
    """--exclude_list and --exclude_mode: test images kept out of the results (classification and segmentation)."""
    group.add_argument("--exclude_list", default=None, type=str,
                       help="test images to keep out of the results, one path a line (tools/find_duplicates.py's "
                            "exclude_list.txt: test images also in the pre-training pool); they are reported apart "
                            "(default: none)")
    group.add_argument("--exclude_mode", default="separate", choices=("separate", "drop"),
                       help="separate: the excluded images' own metrics and predictions are reported beside the "
                            "results; drop: only their count and names (default: separate)")


def check_data_args(args) -> list[str]:
    problems = []
    if args.dataset == "chexpert":
        try:
            uncertain_policy(args.chexpert_uncertain)
        except ValueError as e:
            problems.append(str(e))
    problem = check_norm_policy(args.norm_stats)
    if problem:
        problems.append(problem)
    if args.dataset == "csv":
        problems += _check_csv_args(args)
        if problems:
            return problems
    if args.dataset == "node21" and args.nb_classes not in node21.HEADS:
        problems.append(f"--nb_classes {args.nb_classes}: --dataset node21 takes --nb_classes 2 (two logits, "
                        "cross-entropy: no nodule, nodule) or --nb_classes 1 (one logit, binary cross-entropy)")
        return problems
    expected = len(findings(args))
    if args.nb_classes != expected:
        problems.append(f"--nb_classes {args.nb_classes}: --dataset {args.dataset} has {expected} findings "
                        f"({', '.join(findings(args))}); pass --nb_classes {expected}")
    return problems


def _check_csv_args(args) -> list[str]:
    problems = []
    if bool(args.label_columns) == bool(args.label_column):
        problems.append("--dataset csv takes either --label_columns A,B,... (multi-label) or --label_column C "
                        "(single-label), not both nor neither")
    if args.label_column and not args.classes:
        problems.append(f"--label_column {args.label_column} needs --classes A,B,...: the classes in the order of "
                        "the logits")
    if args.classes and not args.label_column:
        problems.append("--classes goes with --label_column (single-label)")
    for flag in ("train_list", "val_list", "test_list"):
        if not getattr(args, flag):
            problems.append(f"--dataset csv needs --{flag} (a CSV with a {args.path_column!r} column)")
    return problems


def is_single_label(args) -> bool:
    """One class per image (cross-entropy, accuracy): COVIDx, --dataset csv with --label_column, and NODE21's two
    logits."""
    return (args.dataset == "covidx" or (args.dataset == "csv" and bool(args.label_column))
            or (args.dataset == "node21" and args.nb_classes == 2))


def build_transform(args, is_train: bool):
    """The split's transform, normalised with --norm_stats for the dataset's source."""
    mean, std = norm_stats_for(SOURCE_OF[args.dataset], args.norm_stats, args.in_chans)
    aa = None if args.aa in ("", "none", "None") else args.aa
    return build_finetune_transform(is_train, args.input_size, mean, std, args.in_chans, args.build_timm_transform,
                                    aa, args.reprob, args.remode, args.recount, args.color_jitter)


def findings(args) -> list[str]:
    """The findings (multi-label) or classes (single-label) of --dataset, in the order of the logits."""
    if args.dataset == "csv":
        return _names(args.label_columns or args.classes)
    if args.dataset == "node21":
        return list(node21.CLASSES if is_single_label(args) else node21.FINDINGS)
    return list({"chestxray": nih.FINDINGS, "chexpert": CHEXPERT_FINDINGS, "covidx": covidx.CLASSES}[args.dataset])


def _names(spec: str) -> list[str]:
    return [name.strip() for name in spec.split(",") if name.strip()]


@dataclass
class Split:
    """One labelled list: image paths, patients and (once read) labels, plus its rows for writing subsets."""

    role: str  # train | val | test
    source: str  # the list or CSV it came from (or "<file> minus ...")
    paths: np.ndarray  # bytes
    patients: np.ndarray  # bytes
    rows: list | pd.DataFrame  # NIH: the list's lines; CheXpert: the CSV's rows
    labels: np.ndarray | None = None  # [N, K] float32; the test split's stay None until load_labels
    write_as: str | None = None  # a split drawn here, not given: written to output_dir under this name
    excluded: np.ndarray | None = None  # test images named by --exclude_list (bool mask), kept out of the results

    def __len__(self) -> int:
        return len(self.paths)

    def subset(self, keep: np.ndarray, source: str) -> "Split":
        rows = ([r for r, k in zip(self.rows, keep) if k] if isinstance(self.rows, list)
                else self.rows[keep].reset_index(drop=True))
        return replace(self, source=source, paths=self.paths[keep], patients=self.patients[keep], rows=rows,
                       labels=None if self.labels is None else self.labels[keep])

    def write(self, path: str) -> None:
        """The split in its own format (NIH list or CheXpert CSV), so it can be passed back as a list flag."""
        tmp = path + ".tmp"
        if isinstance(self.rows, list):
            with open(tmp, "w", encoding="utf-8") as f:
                f.writelines(line + "\n" for line in self.rows)
        else:
            self.rows.to_csv(tmp, index=False)
        os.replace(tmp, path)


# ---- NIH ChestX-ray14 --------------------------------------------------------------------------------------------

def _nih_roots(data_path: str) -> list[str]:
    return [r for r in (data_path, os.path.join(data_path, nih.ChestXrayNIH.default_dir)) if os.path.isdir(r)]


def _nih_lines(path: str) -> list[str]:
    with open(path, encoding="utf-8-sig") as f:  # -sig: a byte-order mark some editors write is not a name
        return [line.strip() for line in f if line.strip()]


def _nih_split(role: str, given: str | None, default: str, data_path: str, located: dict, with_labels: bool) -> Split:
    flag = f"--{role}_list"
    path = nih.find_list(given, data_path, flag) if given else default
    lines = _nih_lines(path)
    names = [line.split(maxsplit=1)[0] for line in lines]
    split = Split(role, path, np.array([located.get(n, os.path.join(data_path, n)) for n in names], dtype=np.bytes_),
                  np.array([nih.patient_of(n) for n in names], dtype=np.bytes_), lines if with_labels else names)
    labels = _nih_labels(path, lines, flag)  # the test list's too: a bad line fails now, not after training
    if with_labels:
        split.labels = labels
    return split


def _nih_labels(path: str, lines: list[str], flag: str) -> np.ndarray:
    fields = [line.split() for line in lines]
    bad = next((i for i, f in enumerate(fields) if len(f) != 1 + len(nih.FINDINGS)), None)
    if bad is not None:
        raise ValueError(f"{flag} {path}, line {bad + 1}: expected an image name and {len(nih.FINDINGS)} 0/1 labels "
                         f"({', '.join(nih.FINDINGS)}), found {len(fields[bad]) - 1} label(s). Fine-tuning needs "
                         "the labelled lists, like data_splits/chestxray/*_official.txt")
    bad = next(((i, v) for i, f in enumerate(fields) for v in f[1:] if v not in ("0", "1")), None)
    if bad is not None:
        raise ValueError(f"{flag} {path}, line {bad[0] + 1}: label {bad[1]!r}; every label must be 0 or 1")
    return np.array([f[1:] for f in fields], dtype=np.float32)


def _nih_splits(args) -> dict[str, Split]:
    roots = _nih_roots(args.data_path)
    if not roots:
        raise FileNotFoundError(f"--data_path {args.data_path} does not exist; point it at the NIH ChestX-ray14 "
                                "folder (images/ or images_*/images/ inside)")
    located = {}
    for root in reversed(roots):  # --data_path itself wins over its nih_chestxray/ folder
        located.update(nih.image_locations(root))
    return {"train": _nih_split("train", args.train_list, nih.DEFAULT_TRAIN_LIST, args.data_path, located, True),
            "val": _nih_split("val", args.val_list, nih.VAL_LIST, args.data_path, located, True),
            "test": _nih_split("test", args.test_list, nih.TEST_LIST, args.data_path, located, False)}


# ---- CheXpert -----------------------------------------------------------------------------------------------------

def uncertain_policy(spec: str) -> dict[str, str]:
    """--chexpert_uncertain: 'ones', 'zeros', or 'Finding=ones,...' (findings not named take zeros)."""
    if spec in UNCERTAIN_POLICIES:
        return dict.fromkeys(CHEXPERT_FINDINGS, spec)
    policy = dict.fromkeys(CHEXPERT_FINDINGS, "zeros")
    for item in filter(None, (s.strip() for s in spec.split(","))):
        name, _, value = item.partition("=")
        if name not in policy or value not in UNCERTAIN_POLICIES:
            raise ValueError(f"--chexpert_uncertain: '{item}' is not FINDING=ones|zeros with FINDING one of "
                             f"{CHEXPERT_FINDINGS}")
        policy[name] = value
    return policy


def chexpert_labels(df: pd.DataFrame, policy: dict[str, str], csv: str) -> np.ndarray:
    """The 5 findings as 0/1: 1.0 positive, 0.0 and blank negative, -1.0 by the finding's policy."""
    require_columns(df, CHEXPERT_FINDINGS, csv)
    out = np.zeros((len(df), len(CHEXPERT_FINDINGS)), dtype=np.float32)
    for k, name in enumerate(CHEXPERT_FINDINGS):
        cells = df[name].str.strip().to_numpy()
        unknown = sorted(set(cells) - {"1.0", "0.0", "-1.0", "", "1", "0", "-1"})
        if unknown:
            raise ValueError(f"{csv}, column '{name}': unexpected values {unknown[:5]} (expected 1.0, 0.0, -1.0 or "
                             "blank)")
        out[:, k] = np.isin(cells, ("1.0", "1")) | (np.isin(cells, ("-1.0", "-1")) & (policy[name] == "ones"))
    return out


def _chexpert_frontal(csv: str) -> pd.DataFrame:
    """The CSV's frontal rows (as in pre-training), renumbered."""
    df = pd.read_csv(csv, dtype=str, keep_default_na=False, encoding="utf-8-sig")
    require_columns(df, ["Path", "Frontal/Lateral"], csv)
    return df[df["Frontal/Lateral"] == "Frontal"].reset_index(drop=True)


def _chexpert_split(role: str, csv: str, root: str, policy: dict | None) -> Split:
    df = _chexpert_frontal(csv)
    rel = chexpert.relative_paths(df)
    split = Split(role, csv, chexpert.image_paths(root, csv, rel), chexpert.patients_of(rel),
                  df if policy is not None else df[["Path"]])
    if policy is not None:
        split.labels = chexpert_labels(df, policy, csv)
    return split


def _chexpert_csv(given: str | None, root: str, name: str, flag: str) -> str:
    if given:
        return find_given_file(given, flag, root)
    found = chexpert.find_csv(root, name)
    if found is None:
        raise FileNotFoundError(f"CheXpert {name} not found in {root} or one folder below it; pass {flag}")
    return found


def _chexpert_splits(args, seed: int) -> dict[str, Split]:
    root = args.data_path
    if os.path.isdir(os.path.join(root, chexpert.CheXpert.default_dir)):
        root = os.path.join(root, chexpert.CheXpert.default_dir)
    policy = uncertain_policy(args.chexpert_uncertain)
    train = _chexpert_split("train", _chexpert_csv(args.train_list, root, "train.csv", "--train_list"), root, policy)
    if args.val_list:
        val = _chexpert_split("val", _chexpert_csv(args.val_list, root, "", "--val_list"), root, policy)
    else:  # valid.csv is the test set: hold out part of train.csv's patients for model selection
        held = draw_by_patient(train.patients, CHEXPERT_VAL_FRACTION, seed)
        val = replace(train.subset(held, f"{train.source}, {CHEXPERT_VAL_FRACTION:.0%} of patients (seed {seed})"),
                      role="val")
        train = train.subset(~held, f"{train.source} minus the validation patients")
    test = _chexpert_split("test", _chexpert_csv(args.test_list, root, "valid.csv", "--test_list"), root, None)
    chexpert_labels(_chexpert_frontal(test.source), policy, test.source)  # checked now; kept only after training
    return {"train": train, "val": val, "test": test}


# ---- COVIDx -------------------------------------------------------------------------------------------------------

def _covidx_split(role: str, path: str, flag: str, image_dir: str, with_labels: bool) -> Split:
    paths, patients, labels, lines = covidx.parse_file(path, flag, image_dir)  # every label checked now
    sources = [line.split()[-1] for line in lines]
    # patient ids are only unique within a source: the patient is (source, id)
    patients = np.array([f"{s}/{p.decode()}" for s, p in zip(sources, patients)], dtype=np.bytes_)
    return Split(role, path, paths, patients, lines, labels if with_labels else None)


def _covidx_splits(args, seed: int) -> dict[str, Split]:
    train_dir, test_dir = os.path.join(args.data_path, "train"), os.path.join(args.data_path, "test")
    train = _covidx_split("train", covidx.label_file(args.train_list, args.data_path, covidx.TRAIN_FILE,
                                                     "--train_list"), "--train_list", train_dir, True)
    if args.val_list:
        val = _covidx_split("val", covidx.label_file(args.val_list, args.data_path, "", "--val_list"), "--val_list",
                            train_dir, True)
    else:  # COVIDx has no validation list: hold out part of the training patients for selection
        held = draw_by_patient(train.patients, covidx.VAL_FRACTION, seed)
        val = replace(train.subset(held, f"{train.source}, {covidx.VAL_FRACTION:.0%} of patients (seed {seed})"),
                      role="val")
        train = train.subset(~held, f"{train.source} minus the validation patients")
    test = _covidx_split("test", covidx.label_file(args.test_list, args.data_path, covidx.TEST_FILE, "--test_list"),
                         "--test_list", test_dir, False)
    return {"train": train, "val": val, "test": test}


# ---- NODE21 -------------------------------------------------------------------------------------------------------

def _node21_splits(args, with_test_labels: bool = False) -> dict[str, Split]:
    """The reference's train/test lists (given, or train_mae.txt and test_mae.txt in --data_path) with a validation
    share held out of training; or given lists, or a seeded random split, of metadata.csv's images (data/node21.py).
    Every label is checked now, the test list's too."""
    metadata_path = os.path.join(args.data_path, node21.METADATA)
    found = {role: os.path.join(args.data_path, name) for role, name in node21.REFERENCE_LISTS.items()}
    present = {role: path for role, path in found.items() if os.path.isfile(path)}
    if len(present) == 1 and not (args.train_list or args.test_list):
        # one file of the pair alone would otherwise fall back to metadata.csv's random split without a word
        (role, have), = present.items()
        lacking = "test" if role == "train" else "train"
        raise SetupError(f"--data_path holds {have} but not {found[lacking]}: the reference's lists come as a pair. "
                         f"Add {os.path.basename(found[lacking])}, name it with --{lacking}_list, or remove "
                         f"{os.path.basename(have)} to split {node21.METADATA} at random")
    train_list = args.train_list or present.get("train")
    test_list = args.test_list or present.get("test")
    reference = train_list and test_list and not str(train_list).lower().endswith(".csv")
    if reference:
        frames = {"train": node21.read_list(train_list, "--train_list", metadata_path),
                  "test": node21.read_list(test_list, "--test_list", metadata_path)}
        sources = {"train": train_list, "test": test_list}
        if args.val_list:
            frames["val"], sources["val"] = node21.read_list(args.val_list, "--val_list", metadata_path), args.val_list
        else:  # the reference had no validation list: hold out part of the training images to select on
            held = draw_by_patient(frames["train"]["img_name"].to_numpy(dtype=str).astype(np.bytes_),
                                   node21.VAL_FRACTION, args.fraction_seed)
            frames["val"] = frames["train"][held].reset_index(drop=True)
            frames["train"] = frames["train"][~held].reset_index(drop=True)
            sources["val"] = f"{train_list}, {node21.VAL_FRACTION:.0%} of its images (seed {args.fraction_seed})"
            sources["train"] = f"{train_list} minus the validation images"
        write_as = {role: f"node21_{role}.txt" for role in ("train", "val")} if not args.val_list else {}
    else:
        given = [args.train_list, args.val_list, args.test_list]
        if any(given) and not all(given):
            raise SetupError("--dataset node21 takes --train_list and --test_list (the reference's `fname label` "
                             "lists; --val_list optional) or all three lists of metadata.csv's images, or none (a "
                             f"random split of {node21.METADATA} with --fraction_seed)")
        metadata = node21.read_metadata(metadata_path, "--data_path")
        if all(given):
            frames = {role: node21.read_list(path, f"--{role}_list", metadata_path)
                      for role, path in zip(("train", "val", "test"), given)}
            sources, write_as = dict(zip(("train", "val", "test"), given)), {}
        else:
            roles = node21.random_split(len(metadata), args.fraction_seed)
            frames = {role: metadata[roles == role].reset_index(drop=True) for role in ("train", "val", "test")}
            sources = {role: f"{node21.METADATA}, a random {role} share (--fraction_seed {args.fraction_seed})"
                       for role in frames}
            write_as = {role: f"node21_{role}.csv" for role in frames}
    two_logits = is_single_label(args)
    splits = {}
    for role in ("train", "val", "test"):
        df = frames[role]
        names = df["img_name"].to_numpy(dtype=str)
        paths = np.array([node21.image_path(args.data_path, n) for n in names], dtype=np.bytes_)
        labels = df["label"].to_numpy(dtype=np.int64) if two_logits else df["label"].to_numpy(dtype=np.float32)[:, None]
        keep_labels = role != "test" or with_test_labels
        rows = [f"{n} {label}" for n, label in zip(names, df["label"])] if reference else df  # the list's own format
        splits[role] = Split(role, sources[role], paths, names.astype(np.bytes_), rows,
                             labels if keep_labels else None, write_as=write_as.get(role))
    return splits


# ---- your own CSV files -------------------------------------------------------------------------------------------

def _csv_split(role: str, args, with_labels: bool) -> Split:
    """A split from --{role}_list: images in --path_column, labels in --label_columns (0/1 each) or --label_column
    (one of --classes), patients in --patient_column. Every label is checked now, the test list's too."""
    flag = f"--{role}_list"
    path = getattr(args, f"{role}_list")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{flag} {path} not found")
    df = pd.read_csv(path, dtype=str, keep_default_na=False, encoding="utf-8-sig")
    single = bool(args.label_column)
    columns = [args.path_column, *([args.label_column] if single else _names(args.label_columns)),
               *([args.patient_column] if args.patient_column else [])]
    require_columns(df, columns, path)
    rel = df[args.path_column].str.strip().to_numpy()
    paths = np.array([p if os.path.isabs(p) else os.path.join(args.data_path, p) for p in rel], dtype=np.bytes_)
    patients = (df[args.patient_column].str.strip().to_numpy() if args.patient_column else rel).astype(np.bytes_)
    if single:
        classes = _names(args.classes)
        values = df[args.label_column].str.strip()
        unknown = sorted(set(values) - set(classes))
        if unknown:
            row = int(np.flatnonzero(~values.isin(classes).to_numpy())[0])
            raise ValueError(f"{flag} {path}, row {row + 1}, column {args.label_column!r}: class {unknown[0]!r} is "
                             f"not one of --classes {classes} ({len(unknown)} unknown value(s): {unknown[:5]})")
        labels = np.array(values.map({c: k for k, c in enumerate(classes)}), dtype=np.int64)  # a writable copy
    else:
        names = _names(args.label_columns)
        cells = df[names].apply(lambda column: column.str.strip())
        bad = ~cells.isin(["0", "1", "0.0", "1.0"])
        if bad.to_numpy().any():
            row, col = (int(v[0]) for v in np.nonzero(bad.to_numpy()))
            raise ValueError(f"{flag} {path}, row {row + 1}, column {names[col]!r}: label {cells.iat[row, col]!r}; "
                             "every label must be 0 or 1")
        labels = cells.isin(["1", "1.0"]).to_numpy(dtype=np.float32)
    return Split(role, path, paths, patients, df, labels if with_labels else None)


# ---- both ---------------------------------------------------------------------------------------------------------

def draw_by_patient(patients: np.ndarray, fraction: float, seed: int) -> np.ndarray:
    """Mask of whole patients, drawn in a seeded random order until they hold ceil(fraction * N) images."""
    unique, inverse, counts = np.unique(patients, return_inverse=True, return_counts=True)
    order = np.random.default_rng(seed).permutation(len(unique))
    wanted = math.ceil(fraction * len(patients))
    taken = order[: int(np.searchsorted(np.cumsum(counts[order]), wanted)) + 1]
    chosen = np.zeros(len(unique), dtype=bool)
    chosen[taken] = True
    return chosen[inverse]


def check_decodes(split: Split, policy: str) -> None:
    """--check_images: decode a sample (or all) of a split's images now, naming every one that fails."""
    if policy == "none" or not len(split):
        return
    checked, bad = undecodable(split.paths, None if policy == "all" else CHECK_SAMPLE)
    if bad:
        listing = "\n  ".join(f"{p}: {why}" for p, why in bad[:10])
        raise ValueError(f"{len(bad)} of {checked} checked images of the {split.role} list {split.source} do not "
                         f"decode:\n  {listing}\nReplace them or remove their lines (--check_images all checks every "
                         "image; tools/verify_data.py lists them without training)")


def build_splits(args) -> dict[str, Split]:
    """train/val/test for --dataset, checked: every file present, no patient in two splits. The test split holds
    names only; load_labels reads its labels after training."""
    seed = args.fraction_seed
    if args.dataset == "chestxray":
        splits = _nih_splits(args)
    elif args.dataset == "covidx":
        splits = _covidx_splits(args, seed)
    elif args.dataset == "csv":
        splits = {role: _csv_split(role, args, with_labels=role != "test") for role in ("train", "val", "test")}
    elif args.dataset == "node21":
        splits = _node21_splits(args)
    else:
        splits = _chexpert_splits(args, seed)
    for split in splits.values():
        if not len(split):
            raise ValueError(f"--{split.role}_list {split.source} lists no image")
        check_unique(split)
        exists = files_exist(split.paths)
        if not exists.all():
            missing = [p.decode() for p in split.paths[~exists]]
            raise FileNotFoundError(
                f"{len(missing)} of {len(split)} images of the {split.role} list {split.source} are missing:\n  "
                + "\n  ".join(missing[:10]) + ("\n  ..." if len(missing) > 10 else "")
                + "\nCheck --data_path and the list.")
    check_disjoint(splits)
    for split in splits.values():
        check_decodes(split, args.check_images)
    if args.exclude_list:
        splits["test"].excluded = excluded_images(splits["test"], args.exclude_list)
    return splits


def excluded_images(test: Split, exclude_list: str) -> np.ndarray:
    """Mask of the test images --exclude_list names (as tools/find_duplicates.py writes it: one path a line; a path
    matches the same file, or a test image whose path ends with it). An entry that matches no test image is
    reported; a list that matches none is an error (the wrong list, or the wrong --test_list)."""
    if not os.path.isfile(exclude_list):
        raise FileNotFoundError(f"--exclude_list {exclude_list} not found")
    with open(exclude_list, encoding="utf-8-sig") as f:
        entries = [line.strip() for line in f if line.strip()]
    paths = [os.path.abspath(p.decode()) for p in test.paths]
    position = {p: i for i, p in enumerate(paths)}
    mask, unmatched = np.zeros(len(paths), dtype=bool), []
    for entry in entries:
        i = position.get(os.path.abspath(entry))
        if i is None:
            tail = os.sep + entry.lstrip(os.sep)
            i = next((k for k, p in enumerate(paths) if p.endswith(tail)), None)
        if i is None:
            unmatched.append(entry)
        else:
            mask[i] = True
    if not mask.any():
        raise ValueError(f"--exclude_list {exclude_list}: none of its {len(entries)} image(s) is in the test list "
                         f"{test.source} (e.g. {entries[:2]}); give the list made for this test set")
    if unmatched:
        logger.warning("--exclude_list %s: %d of its images are not in the test list (e.g. %s)", exclude_list,
                       len(unmatched), unmatched[:3])
    return mask


def check_unique(split: Split) -> None:
    """An image listed twice would be trained on twice, or scored twice (and counted twice in the test size)."""
    names, first, counts = np.unique(split.paths, return_index=True, return_counts=True)
    if (counts > 1).any():
        twice = names[counts > 1]
        lines = {n: [i + 1 for i in np.flatnonzero(split.paths == n)] for n in twice[:5]}
        listing = "; ".join(f"{os.path.basename(n.decode())} (rows {', '.join(map(str, rows))})"
                            for n, rows in lines.items())
        raise ValueError(f"--{split.role}_list {split.source} lists {len(twice)} image(s) more than once: {listing}. "
                         "Remove the repeated lines (rows count the list's non-empty lines, or the CSV's frontal "
                         "rows).")


def check_disjoint(splits: dict[str, Split]) -> None:
    """No patient may be in two splits: a shared patient lets a model score its own training images."""
    roles = list(splits)
    for i, a in enumerate(roles):
        for b in roles[i + 1:]:
            shared = np.intersect1d(splits[a].patients, splits[b].patients)
            if len(shared):
                raise ValueError(f"the {a} list ({splits[a].source}) and the {b} list ({splits[b].source}) share "
                                 f"{len(shared)} patient(s), e.g. {', '.join(p.decode() for p in shared[:5])}; "
                                 "the splits must be patient-disjoint")


def label_fraction(train: Split, fraction: float, seed: int, out_dir: str, write: bool = True,
                   prefix: str = "train") -> Split:
    """--label_fraction: whole patients drawn with --fraction_seed (the same draw on every rank), written to out_dir
    as <prefix>_<percent>pct_seed<seed> in the split's own format, so the run can be repeated with --train_list, and
    shared. Any split with patients, source, subset() and write() (segmentation's too)."""
    if fraction >= 1.0:
        return train
    patients = len(np.unique(train.patients))
    if fraction * patients < 1:
        raise ValueError(f"--label_fraction {fraction:g} of the {patients} patients of the training list "
                         f"{train.source} is less than one patient; the smallest fraction here is "
                         f"{1 / patients:.2g} (one patient)")
    keep = draw_by_patient(train.patients, fraction, seed)
    ext = ".txt" if isinstance(getattr(train, "rows", None), list) else ".csv"
    path = os.path.join(out_dir, f"{prefix}_{fraction * 100:g}pct_seed{seed}{ext}")
    drawn = train.subset(keep, path)
    if write:
        drawn.write(path)
    return drawn


def load_labels(args, test: Split) -> Split:
    """The test split with its labels, read now (once, after training) from the list whose names were checked at
    start-up. No image is looked up again."""
    if args.dataset == "chestxray":
        lines = _nih_lines(test.source)
        names, labels = [line.split(maxsplit=1)[0] for line in lines], _nih_labels(test.source, lines, "--test_list")
        unchanged = names == list(test.rows)
    elif args.dataset == "covidx":
        paths, _, labels, _ = covidx.parse_file(test.source, "--test_list", os.path.join(args.data_path, "test"))
        unchanged = np.array_equal(paths, test.paths)
    elif args.dataset == "csv":
        read = _csv_split("test", args, with_labels=True)
        labels, unchanged = read.labels, np.array_equal(read.paths, test.paths)
    elif args.dataset == "node21":
        read = _node21_splits(args, with_test_labels=True)["test"]
        labels, unchanged = read.labels, np.array_equal(read.paths, test.paths)
    else:
        df = _chexpert_frontal(test.source)
        labels = chexpert_labels(df, uncertain_policy(args.chexpert_uncertain), test.source)
        unchanged = df["Path"].tolist() == test.rows["Path"].tolist()
    if not unchanged:
        raise SetupError(f"the test list {test.source} changed during the run; its names no longer match the ones "
                         "checked at start-up (restore the list, or score a checkpoint with --eval)")
    return replace(test, labels=labels)


class LabelledDataset(XrayDataset):
    """(image tensor, [K] labels, position) per item; a file that fails to decode stops the run, naming it."""

    def __init__(self, split: Split, transform, dataset: str):
        index = SourceIndex(f"{dataset} {split.role}", "", split.paths, split.patients, [""] * len(split))
        super().__init__(index, transform, bad_files="error")
        self.labels = torch.tensor(split.labels)  # a copy: pandas may hand out read-only arrays

    def __getitem__(self, item):
        i, seed = item if isinstance(item, tuple) else (item, None)  # the training sampler sends a seed
        image, _ = self.decode(i)
        if seed is None:
            return self.transform(image), self.labels[i], i
        with seeded(seed):  # so a resumed epoch augments as the interrupted one did, RandAugment's choices too
            return self.transform(image), self.labels[i], i
