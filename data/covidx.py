"""COVIDx (COVID-Net's benchmark, Wang et al. 2020), the paper's third table: --dataset covidx.

Layout, as the COVID-Net release writes it and the reference reads it: --data_path holds the label files
train_COVIDx9A.txt and test_COVIDx9A.txt (COVIDx9A: 30,130 and 400 lines) and the images in train/ and test/. A label
file has one image a line, `patient_id filename label source`; a file name may hold spaces (everything between the
first field and the last two). --train_list/--test_list name another version's files.

Classes in the reference's order, 4 logits: normal, positive, pneumonia, COVID-19 (COVIDx9A's files use normal,
pneumonia and COVID-19; CXR-2's positive/negative files map negative to normal). The reference reports accuracy over
the 4-way argmax and a 3x3 confusion matrix after merging positive into pneumonia (index 2 -> 1, 3 -> 2).

COVIDx has no validation list; the reference selected its checkpoint on test. Here a seeded, patient-disjoint share of
the training list (VAL_FRACTION, --fraction_seed) is held out for selection and written to output_dir (--val_list
gives one). Half of COVIDx9A's test set (200 of 400 images, source rsna) comes from the RSNA Pneumonia Detection
Challenge, whose images are NIH ChestX-ray14's: a model pre-trained on NIH may have seen them.
"""
import os

import numpy as np

CLASSES = ["normal", "positive", "pneumonia", "COVID-19"]  # the reference's logit order
ALIASES = {"negative": "normal"}  # COVIDx CXR-2's binary files
MERGE = [0, 1, 1, 2]  # the reference's 3-class report: normal, pneumonia (positive with it), COVID-19
MERGED_CLASSES = ["normal", "pneumonia", "COVID-19"]
TRAIN_FILE, TEST_FILE = "train_COVIDx9A.txt", "test_COVIDx9A.txt"
VAL_FRACTION = 0.1  # of the training list's patients, when no --val_list is given


def parse_line(line: str, path: str, number: int, flag: str) -> tuple[str, str, int, str]:
    """(patient, file name, class index, source) of one label-file line."""
    fields = line.split()
    if len(fields) < 4:
        raise ValueError(f"{flag} {path}, line {number}: expected 'patient_id filename label source', found "
                         f"{len(fields)} field(s): {line!r}")
    label = ALIASES.get(fields[-2], fields[-2])
    if label not in CLASSES:
        raise ValueError(f"{flag} {path}, line {number}: label {fields[-2]!r} is not one of {CLASSES} (or "
                         f"{sorted(ALIASES)})")
    return fields[0], " ".join(fields[1:-2]), CLASSES.index(label), fields[-1]


def read_lines(path: str) -> list[str]:
    with open(path, encoding="utf-8-sig") as f:
        return [line.strip() for line in f if line.strip()]


def label_file(given: str | None, data_path: str, default: str, flag: str) -> str:
    path = given or os.path.join(data_path, default)
    if not os.path.isfile(path) and given and os.path.isfile(os.path.join(data_path, given)):
        path = os.path.join(data_path, given)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{flag}: {path} not found; --data_path must hold {default} (the COVID-Net label "
                                f"file), or {flag} must name another version's")
    return path


def parse_file(path: str, flag: str, image_dir: str) -> tuple[np.ndarray, np.ndarray, np.ndarray, list[str]]:
    """(image paths, patients, class indices, sources) of a label file, images under image_dir."""
    lines = read_lines(path)
    parsed = [parse_line(line, path, k + 1, flag) for k, line in enumerate(lines)]
    paths = np.array([os.path.join(image_dir, name) for _, name, _, _ in parsed], dtype=np.bytes_)
    patients = np.array([patient for patient, _, _, _ in parsed], dtype=np.bytes_)
    labels = np.array([label for _, _, label, _ in parsed], dtype=np.int64)
    return paths, patients, labels, lines
