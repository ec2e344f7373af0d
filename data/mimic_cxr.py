"""MIMIC-CXR-JPG 2.0.0 / 2.1.0 (Johnson et al., 2019), PhysioNet (credentialed access).

<root>/mimic-cxr-2.0.0-metadata.csv[.gz] and mimic-cxr-2.0.0-split.csv[.gz] drive the index (2.1.0
keeps these names); images sit under files/ or the reference's self-made files_resized_320/:
  files/p{subject_id[:2]}/p{subject_id}/s{study_id}/{dicom_id}.jpg
Pre-training keeps split == 'train' and ViewPosition AP or PA (the reference filter); a blank or
unusual ViewPosition is not frontal and is left out. Like the reference, which starts from the label
table, only images of studies with a row in mimic-cxr-2.0.0-chexpert.csv[.gz] are kept when that file
is present; --mimic_cxr_unlabeled keeps the other studies' images too, and without the file every
study is used (the log says so). 'validate' and 'test' subjects form the held-out set for the
leakage guard.
"""
import functools
import logging
import os

import numpy as np
import pandas as pd

from data.base import MONITOR_IMAGES, Source, SourceIndex, as_bytes, require_columns
from util.args import add_bool_flag

logger = logging.getLogger(__name__)
LABEL_TABLE = "mimic-cxr-2.0.0-chexpert"


def _find_optional(root: str, stem: str) -> str | None:
    for name in (f"{stem}.csv.gz", f"{stem}.csv"):
        path = os.path.join(root, name)
        if os.path.isfile(path):
            return path
    return None


def _find(root: str, stem: str) -> str:
    path = _find_optional(root, stem)
    if path is None:
        raise FileNotFoundError(f"mimic_cxr: {stem}.csv.gz (or .csv) not found in {root}")
    return path


def _labelled_studies(df: pd.DataFrame, label_path: str) -> pd.Series:
    """True for rows whose (subject_id, study_id) has a row in the label table: the reference's join."""
    table = pd.read_csv(label_path, dtype=str, keep_default_na=False, usecols=lambda c: c in ("subject_id", "study_id"))
    require_columns(table, ["subject_id", "study_id"], label_path)
    studies = pd.MultiIndex.from_frame(table[["subject_id", "study_id"]])
    return pd.Series(pd.MultiIndex.from_frame(df[["subject_id", "study_id"]]).isin(studies), index=df.index)


class MimicCXR(Source):
    name = "mimic_cxr"
    default_dir = "mimic_cxr"
    default_views = ("AP", "PA")

    @classmethod
    def add_args(cls, group) -> None:
        add_bool_flag(group, "mimic_cxr_unlabeled", False,
                      "mimic_cxr: also pre-train on images of studies without a row in "
                      "mimic-cxr-2.0.0-chexpert.csv(.gz); the reference, which starts from that label table, leaves "
                      "them out")

    @staticmethod
    def image_dir(root: str) -> str:
        resized = os.path.join(root, "files_resized_320")
        return resized if os.path.isdir(resized) else os.path.join(root, "files")

    def inputs(self, args) -> list[str]:
        root = self.resolve_root(args)
        found = [_find_optional(root, stem) for stem in ("mimic-cxr-2.0.0-metadata", "mimic-cxr-2.0.0-split",
                                                         LABEL_TABLE)]
        return [root, *filter(None, found)]

    def index(self, args) -> SourceIndex:
        root = self.resolve_root(args)
        meta_path, split_path = _find(root, "mimic-cxr-2.0.0-metadata"), _find(root, "mimic-cxr-2.0.0-split")
        wanted = ("dicom_id", "subject_id", "study_id", "ViewPosition", "split")  # the other columns are not parsed
        meta = pd.read_csv(meta_path, dtype=str, keep_default_na=False, usecols=lambda c: c in wanted)
        require_columns(meta, ["dicom_id", "subject_id", "study_id", "ViewPosition"], meta_path)
        split = pd.read_csv(split_path, dtype=str, keep_default_na=False, usecols=lambda c: c in wanted)
        require_columns(split, ["dicom_id", "split"], split_path)
        df = meta[["dicom_id", "subject_id", "study_id", "ViewPosition"]].merge(
            split[["dicom_id", "split"]], on="dicom_id", how="left")
        if df["split"].eq("").any() or df["split"].isna().any():
            missing = int((df["split"].eq("") | df["split"].isna()).sum())
            raise ValueError(f"mimic_cxr: {missing} images of {meta_path} have no row in {split_path}; "
                             "are both files from the same release?")
        held_out = set(df.loc[df["split"].isin(["validate", "test"]), "subject_id"])
        folder = self.image_dir(root)
        validate = df[(df["split"] == "validate") & df["ViewPosition"].str.strip().isin(["AP", "PA"])]
        n_all = len(df)
        df = df[df["split"] == "train"]
        filters = [("metadata", n_all), ("split == train", len(df))]
        label_path = _find_optional(root, LABEL_TABLE)
        if label_path is not None and not args.mimic_cxr_unlabeled:
            labelled = _labelled_studies(df, label_path)
            filters.append((f"studies in {os.path.basename(label_path)} ({int((~labelled).sum())} images of "
                            "unlabelled studies left out, as the reference; --mimic_cxr_unlabeled keeps them)",
                            int(labelled.sum())))
            df = df[labelled]
        elif label_path is None:
            logger.info("mimic_cxr: no %s.csv(.gz) in %s, so every study is used, also those without labels (the "
                        "reference pre-trains only on studies of that label table)", LABEL_TABLE, root)
        sid = df["subject_id"].to_numpy()
        idx = SourceIndex(self.name, root, _image_paths(folder, df), sid, df["ViewPosition"].str.strip().to_numpy(),
                          held_out_patients=held_out, held_out_name="split validate+test", filters=filters)
        idx.monitor_paths = [p.decode() for p in _image_paths(folder, validate[:MONITOR_IMAGES]) if os.path.isfile(p)]
        return idx


def _image_paths(folder: str, df) -> np.ndarray:
    """files/p{subject[:2]}/p{subject}/s{study}/{dicom}.jpg for every row, built column-wise (bytes)."""
    subject, study, dicom = (as_bytes(df[c].to_numpy()) for c in ("subject_id", "study_id", "dicom_id"))
    parts = [os.path.join(folder, "p").encode(), np.strings.slice(subject, 2), b"/p", subject, b"/s", study, b"/",
             dicom, b".jpg"]
    return functools.reduce(np.strings.add, parts)
