"""NODE21 (Sogancioglu et al., 2021), lung nodules on frontal chest X-rays: --dataset node21.

Layout, as the public release's processed data: --data_path holds metadata.csv and images/ with one MetaImage per
radiograph (1024 x 1024 .mha files, read with SimpleITK). metadata.csv has a row per nodule box: `img_name`, `label`
(1: nodule, 0: an image without one) and the box (`x`, `y`, `width`, `height`); an image with several nodules has
several rows, merged here into one image-level label. Other columns are ignored.

The task is image-level: does this radiograph show a nodule. One logit, binary cross-entropy, AUROC (the measure of
NODE21's classification track), in the multi-label machinery with one finding.

The public release has no split files (the challenge's test set stayed hidden) and no patient ids. Without
--train_list/--val_list/--test_list the images are split at random with --fraction_seed: TEST_FRACTION for test,
VAL_FRACTION for validation, the rest for training, each image its own patient; the three lists are written to
output_dir (node21_{train,val,test}.csv, metadata format) so the split can be passed back and shared. A given list is
a CSV in metadata format (the rows of its images) or a text file of image names, one per line, whose labels come
from metadata.csv. NODE21's images come from JSRT, PadChest, ChestX-ray14 and Open-I: a model pre-trained on NIH
ChestX-ray14 may have seen some of them.
"""
import os

import numpy as np
import pandas as pd

from data.base import require_columns

FINDINGS = ["Nodule"]
METADATA = "metadata.csv"
IMAGE_DIR = "images"
TEST_FRACTION, VAL_FRACTION = 0.2, 0.1  # of all images, when no lists are given
LABELS = ("0", "1", "0.0", "1.0")


def read_metadata(path: str, flag: str) -> pd.DataFrame:
    """One row per image: img_name and the merged 0/1 label (1 if any of its rows is a nodule). Every label is
    checked now, naming the file and row."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{flag}: {path} not found; --data_path must hold NODE21's {METADATA} and "
                                f"{IMAGE_DIR}/ (the release's processed data)")
    df = pd.read_csv(path, dtype=str, keep_default_na=False, encoding="utf-8-sig")
    require_columns(df, ["img_name", "label"], path)
    labels = df["label"].str.strip()
    bad = ~labels.isin(LABELS)
    if bad.any():
        row = int(np.flatnonzero(bad.to_numpy())[0])
        raise ValueError(f"{flag} {path}, row {row + 1}, column 'label': {labels.iat[row]!r}; every label must be 0 "
                         "(no nodule) or 1 (a nodule box)")
    merged = pd.DataFrame({"img_name": df["img_name"].str.strip(), "label": labels.isin(["1", "1.0"]).astype(int)})
    return merged.groupby("img_name", sort=False, as_index=False)["label"].max()


def read_list(path: str, flag: str, metadata: pd.DataFrame) -> pd.DataFrame:
    """A given split: a metadata-format CSV, or image names one per line labelled from metadata.csv."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{flag} {path} not found")
    if path.lower().endswith(".csv"):
        return read_metadata(path, flag)
    with open(path, encoding="utf-8-sig") as f:
        names = [line.strip() for line in f if line.strip()]
    known = dict(zip(metadata["img_name"], metadata["label"]))
    unknown = [n for n in names if n not in known]
    if unknown:
        raise ValueError(f"{flag} {path}: {len(unknown)} image(s) are not in {METADATA}, e.g. {unknown[:3]}; list "
                         "names as metadata.csv's img_name column writes them")
    return pd.DataFrame({"img_name": names, "label": [known[n] for n in names]})


def image_path(data_path: str, name: str) -> str:
    """images/<img_name>, with .mha added when the name has no extension."""
    return os.path.join(data_path, IMAGE_DIR, name if os.path.splitext(name)[1] else name + ".mha")


def random_split(n: int, seed: int) -> np.ndarray:
    """Role per image ('train', 'val', 'test'), drawn with `seed`."""
    order = np.random.default_rng(seed).permutation(n)
    n_test, n_val = round(TEST_FRACTION * n), round(VAL_FRACTION * n)
    roles = np.full(n, "train", dtype=object)
    roles[order[:n_test]] = "test"
    roles[order[n_test:n_test + n_val]] = "val"
    return roles
