"""CheXpert v1.0 (Irvin et al., AAAI 2019), Stanford ML Group.

Layouts read, all with the same train.csv (Path prefix CheXpert-v1.0-small/ or CheXpert-v1.0/):
  (a) CheXpert-v1.0-small/{train.csv, valid.csv, train/patientNNNNN/studyN/viewN_*.jpg}
  (b) CheXpert-v1.0/ (full resolution), the same tree
  (c) the Stanford AIMI "batch" download, whose folders do not match the CSV paths:
      <root>/CheXpert-v1.0 batch 1 (validate & csv)/train.csv, <root>/CheXpert-v1.0 batch 2 (train 1)/patient...
      Images are then found by their patientN/studyN/viewN file name.
Pre-training uses train.csv only (valid.csv is an evaluation set), frontal views as in the reference:
191,027 of 223,414 images in the real file.
"""
import glob
import os
import re

import numpy as np
import pandas as pd

from data.base import MONITOR_IMAGES, Source, SourceIndex, as_bytes, require_columns

_KEY = re.compile(r"(patient\d+/study\d+/view\d+_\w+\.jpg)$")


def find_csv(root: str, name: str) -> str | None:
    direct = os.path.join(root, name)
    if os.path.isfile(direct):
        return direct
    nested = sorted(glob.glob(os.path.join(glob.escape(root), "*", name)))
    return nested[0] if nested else None


def _batch_index(root: str) -> dict[str, str]:
    """patientN/studyN/viewN_x.jpg -> file, over every folder below root (the AIMI batch layout)."""
    index = {}
    for folder, _, files in os.walk(root):
        for f in files:
            if f.endswith(".jpg"):
                match = _KEY.search(os.path.join(folder, f).replace(os.sep, "/"))
                if match:
                    index[match.group(1)] = os.path.join(folder, f)
    return index


def patients_of(rel: np.ndarray) -> np.ndarray:
    """patientNNNNN of every path (bytes), b"" where there is none."""
    if not len(rel):
        return rel
    _, word, after = np.strings.partition(rel, b"patient")
    return np.strings.add(word, np.strings.partition(after, b"/")[0])


def _joined(folder: str, rel: np.ndarray) -> np.ndarray:
    return np.strings.add(os.path.join(folder, "").encode(), rel)


def relative_paths(df: pd.DataFrame) -> np.ndarray:
    """The Path column without its CheXpert-v1.0[-small]/ prefix (bytes): train/patientN/studyN/viewN_x.jpg."""
    return np.strings.partition(as_bytes(df["Path"].to_numpy()), b"/")[2]


def image_paths(root: str, csv: str, rel: np.ndarray) -> np.ndarray:
    """Where the files of a CSV's rows are: beside the CSV, under root, or (AIMI batches) found by file key."""
    paths = _joined(os.path.dirname(csv), rel)
    if len(paths) and not os.path.isfile(paths[0]) and not os.path.isfile(_joined(root, rel[:1])[0]):
        index = _batch_index(root)
        out = []
        for r in (r.decode() for r in rel):
            match = _KEY.search(r)
            out.append(index.get(match.group(1), os.path.join(root, r)) if match else os.path.join(root, r))
        return as_bytes(out)
    if len(paths) and not os.path.isfile(paths[0]):
        return _joined(root, rel)
    return paths


class CheXpert(Source):
    name = "chexpert"
    default_dir = "CheXpert-v1.0-small"
    default_views = ("frontal",)

    def index(self, args) -> SourceIndex:
        root = self.resolve_root(args)
        csv = find_csv(root, "train.csv")
        if csv is None:
            raise FileNotFoundError(f"chexpert: train.csv not found in {root} or one folder below it")
        df = pd.read_csv(csv, dtype=str, keep_default_na=False)
        require_columns(df, ["Path", "Frontal/Lateral", "AP/PA"], csv)
        rel = relative_paths(df)
        paths = image_paths(root, csv, rel)
        frontal = df["Frontal/Lateral"].to_numpy() == "Frontal"
        views = np.where(frontal, df["AP/PA"].to_numpy(), "Lateral")
        findings = [c for c in df.columns[5:] if c != "No Finding"]
        idx = SourceIndex(self.name, root, paths, patients_of(rel), views, filters=[("train.csv", len(paths))],
                          labels=(df[findings].to_numpy() == "1.0").astype(np.float32))
        valid = find_csv(root, "valid.csv")
        if valid:
            held = pd.read_csv(valid, dtype=str, keep_default_na=False, usecols=["Path", "Frontal/Lateral"])
            idx.held_out_patients = {p.decode() for p in patients_of(as_bytes(held["Path"].to_numpy()))}
            idx.held_out_name = "valid.csv"
            frontal_rel = held.loc[held["Frontal/Lateral"] == "Frontal", "Path"].str.split("/", n=1).str[1]
            idx.monitor_paths = [p for r in frontal_rel[:MONITOR_IMAGES]
                                 if os.path.isfile(p := os.path.join(os.path.dirname(valid), r))]
        return idx

    def inputs(self, args) -> list[str]:
        root = self.resolve_root(args)
        return [root, *filter(None, (find_csv(root, "train.csv"), find_csv(root, "valid.csv")))]
