"""NODE21 (Sogancioglu et al., 2021), lung nodules on frontal chest X-rays: --dataset node21.

Images: --data_path/images/ with one MetaImage per radiograph (1024 x 1024 .mha files, read with SimpleITK and
windowed to 8 bits). The task is image-level: does this radiograph show a nodule. Two heads, as the reference has:
--nb_classes 2, two logits with cross-entropy (single-label; the classes `no nodule`, `nodule`), or --nb_classes 1,
one logit with binary cross-entropy (--loss_func bce; the multi-label machinery with one finding). Either way the
test AUROC of the nodule score is NODE21's measure (its classification track).

Two ways to give the labels:
- The reference's lists: --data_path holds train_mae.txt and test_mae.txt, one `fname label` line per image (label 1:
  a nodule, 0: none), or --train_list/--test_list name such files. The reference had no validation list: without
  --val_list, VAL_FRACTION of the training images (each its own patient; the release has no patient ids) are held out
  with --fraction_seed to select on, and the two parts are written to output_dir (node21_train.txt, node21_val.txt,
  the same format) so the split can be given back. The test list is scored once.
- The public release's processed data: metadata.csv, a row per nodule box (`img_name`, `label`, and the box `x`, `y`,
  `width`, `height`); an image with several nodules has several rows, merged here into one image-level label. The
  release has no split files (the challenge's test set stayed hidden): without lists the images are split at random
  with --fraction_seed, TEST_FRACTION for test, VAL_FRACTION for validation, and the three lists are written to
  output_dir (node21_{train,val,test}.csv, metadata format). A given list is then a CSV in metadata format, or a
  text file of image names, one per line, labelled from metadata.csv.

NODE21's images come from JSRT, PadChest, ChestX-ray14 and Open-I: a model pre-trained on NIH ChestX-ray14 may have
seen some of them.
"""
import os

import numpy as np
import pandas as pd

from data.base import require_columns

FINDINGS = ["Nodule"]  # --nb_classes 1: one logit
CLASSES = ["no nodule", "nodule"]  # --nb_classes 2: two logits, in the label's order
HEADS = (1, 2)
METADATA = "metadata.csv"
REFERENCE_LISTS = {"train": "train_mae.txt", "test": "test_mae.txt"}  # the reference's `fname label` files
IMAGE_DIR = "images"
TEST_FRACTION, VAL_FRACTION = 0.2, 0.1  # of all images when no lists are given; VAL_FRACTION also of train_mae.txt
LABELS = ("0", "1", "0.0", "1.0")


def read_metadata(path: str, flag: str) -> pd.DataFrame:
    """One row per image: img_name and the merged 0/1 label (1 if any of its rows is a nodule). Every label is
    checked now, naming the file and row."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{flag}: {path} not found; --data_path must hold NODE21's {METADATA} and "
                                f"{IMAGE_DIR}/ (the release's processed data), or the reference's "
                                f"{' and '.join(REFERENCE_LISTS.values())} with {IMAGE_DIR}/")
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


def read_list(path: str, flag: str, metadata_path: str) -> pd.DataFrame:
    """A given split as (img_name, label) rows: a metadata-format CSV; a text file of `fname label` lines (the
    reference's train_mae.txt); or a text file of names, one per line, labelled from metadata_path."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{flag} {path} not found")
    if path.lower().endswith(".csv"):
        return read_metadata(path, flag)
    with open(path, encoding="utf-8-sig") as f:
        lines = [(number, line.split()) for number, line in enumerate(f, start=1) if line.strip()]
    if lines and all(len(tokens) == 2 for _, tokens in lines):
        bad = next(((n, t) for n, t in lines if t[1] not in LABELS), None)
        if bad is not None:
            raise ValueError(f"{flag} {path}, line {bad[0]}: label {bad[1][1]!r}; every label must be 0 (no nodule) "
                             "or 1 (a nodule)")
        return pd.DataFrame({"img_name": [t[0] for _, t in lines],
                             "label": [int(float(t[1])) for _, t in lines]})
    odd = next((n for n, tokens in lines if len(tokens) != 1), None)
    if odd is not None:
        raise ValueError(f"{flag} {path}, line {odd}: expected `fname label` on every line (the reference's "
                         "train_mae.txt format) or an image name alone on every line")
    names = [tokens[0] for _, tokens in lines]
    metadata = read_metadata(metadata_path, "--data_path")
    known = dict(zip(metadata["img_name"], metadata["label"]))
    unknown = [n for n in names if n not in known]
    if unknown:
        raise ValueError(f"{flag} {path}: {len(unknown)} image(s) are not in {METADATA}, e.g. {unknown[:3]}; list "
                         "names as metadata.csv's img_name column writes them, or give `fname label` lines")
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
