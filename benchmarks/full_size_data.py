"""The three reference sources at their real sizes: metadata with the real row counts and column layouts, and one
file on disk per row, every file a hard link to one of a few small generated images.

    python -m benchmarks.full_size_data --out /tmp/full_size   # about a minute; a second call finds it done

CheXpert-v1.0-small/train.csv   223,414 rows (64,540 patients, 187,641 studies; 191,027 frontal), valid.csv 234 rows
nih_chestxray/                  Data_Entry_2017_v2020.csv 112,120 rows, the real file names of the official lists,
                                train_val_list.txt and test_list.txt, images/ flat
mimic_cxr/                      metadata 377,110 rows (AP 147,173, PA 96,161, LATERAL 82,853, LL 35,133, the rest
                                blank), split per subject (about 98% train), a label row per study, files/ tree
Counts follow shared/docs/datasets.md; ids and labels are synthetic. ext4 allows 65,000 links per file, so the
rows rotate among LINK_SOURCES files per source.
"""
import argparse
import os
import time

import numpy as np

from data.chestxray_nih import OFFICIAL_SPLITS_DIR, read_name_list
from data.synthetic import (
    CHEXPERT_HEADER,
    MIMIC_LABELS,
    MIMIC_META_HEADER,
    NIH_FINDINGS,
    NIH_HEADER,
    _write_csv,
    _write_lines,
    chest_image,
    save_image,
)

LINK_SOURCES = 16  # 377,110 / 16 < 65,000 links per file
DONE = "full_size_data.done"
CHEXPERT_ROWS, CHEXPERT_PATIENTS, CHEXPERT_STUDIES, CHEXPERT_LATERAL = 223_414, 64_540, 187_641, 32_387
MIMIC_ROWS, MIMIC_SUBJECTS = 377_110, 65_379
MIMIC_VIEWS = {"AP": 147_173, "PA": 96_161, "LATERAL": 82_853, "LL": 35_133}  # the rest (15,790) blank


def _sources(folder: str, ext: str, size=(96, 80)) -> list[str]:
    paths = [os.path.join(folder, f"source_{k:02d}{ext}") for k in range(LINK_SOURCES)]
    for k, path in enumerate(paths):
        save_image(path, chest_image(*size, seed=k))
    return paths


def _link_all(targets: list[str], sources: list[str]) -> None:
    made = set()
    for i, target in enumerate(targets):
        folder = os.path.dirname(target)
        if folder not in made:
            os.makedirs(folder, exist_ok=True)
            made.add(folder)
        os.link(sources[i % len(sources)], target)


def _label_cells(rng, rows: int, cols: int) -> np.ndarray:
    return np.array(["", "1.0", "0.0", "-1.0"])[rng.integers(0, 4, (rows, cols))]


def make_chexpert(data_path: str, rng) -> int:
    root = os.path.join(data_path, "CheXpert-v1.0-small")
    # studies per patient: every patient one, the rest spread at random; images per study: one, and a second
    # (lateral, or a second frontal) for the first studies until the row count is reached
    per_patient = 1 + np.bincount(rng.integers(0, CHEXPERT_PATIENTS, CHEXPERT_STUDIES - CHEXPERT_PATIENTS),
                                  minlength=CHEXPERT_PATIENTS)
    two_views = CHEXPERT_ROWS - CHEXPERT_STUDIES
    rows, targets, study = [], [], 0
    for p, n_studies in enumerate(per_patient, start=1):
        for s in range(1, n_studies + 1):
            views = ["frontal"] + (["lateral" if study < CHEXPERT_LATERAL else "frontal"] if study < two_views else [])
            for v, kind in enumerate(views, start=1):
                rel = f"train/patient{p:05d}/study{s}/view{v}_{kind}.jpg"
                rows.append((rel, kind))
                targets.append(os.path.join(root, rel))
            study += 1
    labels = _label_cells(rng, len(rows), 14)
    appa = rng.choice(["AP", "PA"], len(rows), p=[161_590 / 191_010, 29_420 / 191_010])
    table = [[f"CheXpert-v1.0-small/{rel}", "Female" if i % 2 else "Male", str(20 + i % 70),
              kind.capitalize(), "" if kind == "lateral" else appa[i], *labels[i]]
             for i, (rel, kind) in enumerate(rows)]
    _write_csv(os.path.join(root, "train.csv"), CHEXPERT_HEADER, table)
    valid = [[f"CheXpert-v1.0-small/valid/patient{64_541 + i:05d}/study1/view1_frontal.jpg", "Male", "60", "Frontal",
              "AP", *("1.0" if (i + j) % 3 == 0 else "0.0" for j in range(14))] for i in range(234)]
    _write_csv(os.path.join(root, "valid.csv"), CHEXPERT_HEADER, valid)
    sources = _sources(os.path.join(data_path, "link_sources", "chexpert"), ".jpg")
    _link_all(targets + [os.path.join(root, r[0].split("/", 1)[1]) for r in valid], sources)
    return sum(kind == "frontal" for _, kind in rows)


def make_nih(data_path: str, rng) -> int:
    root = os.path.join(data_path, "nih_chestxray")
    lists = {split: read_name_list(os.path.join(OFFICIAL_SPLITS_DIR, f"{split}_official.txt"))
             for split in ("train", "val", "test")}
    names = sorted(n for split in lists.values() for n in split)
    findings = np.array(NIH_FINDINGS)[rng.integers(0, len(NIH_FINDINGS), len(names))]
    os.makedirs(root, exist_ok=True)
    with open(os.path.join(root, "Data_Entry_2017_v2020.csv"), "w", encoding="utf-8") as f:
        f.write(NIH_HEADER + "\n")
        f.writelines(f"{n},{findings[k]},{k % 7},{int(n[:8])},{30 + k % 50},{'M' if k % 2 else 'F'},"
                     f"{'PA' if k % 5 < 3 else 'AP'},2500,2048,0.168,0.168\n" for k, n in enumerate(names))
    _write_lines(os.path.join(root, "train_val_list.txt"), sorted(lists["train"] + lists["val"]))
    _write_lines(os.path.join(root, "test_list.txt"), lists["test"])
    sources = _sources(os.path.join(data_path, "link_sources", "nih"), ".png")
    _link_all([os.path.join(root, "images", n) for n in names], sources)
    return len(lists["train"])


def make_mimic(data_path: str, rng) -> int:
    root = os.path.join(data_path, "mimic_cxr")
    subjects = 10_000_000 + rng.choice(9_999_999, MIMIC_SUBJECTS, replace=False)
    # images per subject: at least one, in studies of 1 to 3 images
    per_subject = 1 + np.bincount(rng.integers(0, MIMIC_SUBJECTS, MIMIC_ROWS - MIMIC_SUBJECTS),
                                  minlength=MIMIC_SUBJECTS)
    split_of = rng.choice(["train", "validate", "test"], MIMIC_SUBJECTS, p=[0.9784, 0.0079, 0.0137])
    views = np.array([v for v, n in MIMIC_VIEWS.items() for _ in range(n)] +
                     [""] * (MIMIC_ROWS - sum(MIMIC_VIEWS.values())))[rng.permutation(MIMIC_ROWS)]
    words = rng.integers(0, 2**32, (MIMIC_ROWS, 5), dtype=np.uint64)
    meta, split, studies, targets, study_id, row = [], [], [], [], 50_000_000, 0
    for subject, n_images, subject_split in zip(subjects, per_subject, split_of):
        s = str(subject)
        left = int(n_images)
        while left:
            take = min(left, 1 + (row % 3))
            study = str(study_id)
            studies.append((s, study))
            for _ in range(take):
                dicom = "-".join(f"{w:08x}" for w in words[row])
                meta.append([dicom, s, study, "CHEST (PA AND LAT)", views[row], "3056", "2544", "21530412",
                             "104512.25", "CHEST (PA AND LAT)", "postero-anterior", "Erect"])
                split.append([dicom, study, s, subject_split])
                targets.append(os.path.join(root, "files", f"p{s[:2]}", f"p{s}", f"s{study}", f"{dicom}.jpg"))
                row += 1
            left -= take
            study_id += 1
    labels = _label_cells(rng, len(studies), 14)
    _write_csv(os.path.join(root, "mimic-cxr-2.0.0-metadata.csv.gz"), MIMIC_META_HEADER, meta)
    _write_csv(os.path.join(root, "mimic-cxr-2.0.0-split.csv.gz"), ["dicom_id", "study_id", "subject_id", "split"],
               split)
    _write_csv(os.path.join(root, "mimic-cxr-2.0.0-chexpert.csv.gz"), ["subject_id", "study_id", *MIMIC_LABELS],
               [[s, t, *labels[k]] for k, (s, t) in enumerate(studies)])
    sources = _sources(os.path.join(data_path, "link_sources", "mimic"), ".jpg")
    _link_all(targets, sources)
    return sum(sp[3] == "train" and m[4] in ("AP", "PA") for m, sp in zip(meta, split))


def make_full_size(data_path: str, seed: int = 0) -> dict[str, int]:
    """The three sources under data_path (once; a finished tree is left as it is). Returns the pre-training image
    count of each source under the default flags."""
    done = os.path.join(data_path, DONE)
    if os.path.isfile(done):
        with open(done) as f:
            return {name: int(n) for name, n in (line.split() for line in f)}
    rng = np.random.default_rng(seed)
    counts = {"chexpert": make_chexpert(data_path, rng), "chestxray_nih": make_nih(data_path, rng),
              "mimic_cxr": make_mimic(data_path, rng)}
    _write_lines(done, [f"{name} {n}" for name, n in counts.items()])
    return counts


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True, help="folder to use as --data_path")
    args = parser.parse_args()
    start = time.time()
    counts = make_full_size(args.out)
    print(f"{args.out}: " + ", ".join(f"{k} {v}" for k, v in counts.items()) +
          f" pre-training images ({sum(counts.values())} in all), {time.time() - start:.0f} s")


if __name__ == "__main__":
    main()
