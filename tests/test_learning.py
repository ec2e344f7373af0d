"""The guard against labels misaligned with images, for every dataset reader: a short fine-tuning on findings drawn
into the fixture images (data/synthetic.py says how) scores well above chance on the test list, and the same run with
the training labels shuffled among the training images scores at chance. A reader that pairs an image with another
image's labels, reorders the findings or drops the label columns fails the first half."""
import json
import os

import numpy as np
import pandas as pd
import pytest

import main_finetune_chestxray as ft_main
from data.synthetic import make_covidx, make_csv_dataset, make_nih_labelled, make_node21
from tests.helpers import argv

SHUFFLE_SEEDS = (0, 1)


def _shuffle_lines(path: str, label_of, relabel, seed: int) -> None:
    """Permute the labels of a text list among its lines, keeping every image name in place."""
    lines = open(path).read().splitlines()
    labels = [label_of(line) for line in lines]
    order = np.random.default_rng(seed).permutation(len(lines))
    with open(path, "w") as f:
        f.writelines(relabel(line, labels[k]) + "\n" for line, k in zip(lines, order))


def _shuffle_csv(path: str, columns: list[str], seed: int) -> None:
    df = pd.read_csv(path, dtype=str, keep_default_na=False)
    order = np.random.default_rng(seed).permutation(len(df))
    df[columns] = df[columns].iloc[order].to_numpy()
    df.to_csv(path, index=False)


def nih(root, shuffle):
    lists = make_nih_labelled(str(root), patients=(40, 10, 25), size=(64, 64))
    for role in ("train", "val") if shuffle is not None else ():
        _shuffle_lines(lists[role], lambda line: line.split(" ", 1)[1],
                       lambda line, lab: f"{line.split()[0]} {lab}", shuffle)
    flags = {"data_path": root, **{f"{r}_list": p for r, p in lists.items()}}
    return flags, ("auroc", ["Atelectasis", "Cardiomegaly", "Effusion"])  # the findings drawn in


def csv(root, shuffle):
    lists = make_csv_dataset(str(root), patients=(40, 10, 40), size=(64, 64))
    for role in ("train", "val") if shuffle is not None else ():
        _shuffle_csv(lists[role], ["opacity"], shuffle)
    flags = {"dataset": "csv", "data_path": root, "label_columns": "opacity", "patient_column": "patient",
             "nb_classes": 1, **{f"{r}_list": p for r, p in lists.items()}}
    return flags, ("auroc", ["opacity"])


def node21(root, shuffle):
    make_node21(str(root), images=150, size=(64, 64))
    meta = pd.read_csv(os.path.join(root, "metadata.csv"), dtype=str).drop_duplicates("img_name")[["img_name", "label"]]
    paths = {}
    for role, rows in (("train", meta[:90]), ("val", meta[90:110]), ("test", meta[110:])):
        paths[role] = os.path.join(root, f"{role}.csv")
        rows.to_csv(paths[role], index=False)
    for role in ("train", "val") if shuffle is not None else ():
        _shuffle_csv(paths[role], ["label"], shuffle)
    return {"dataset": "node21", "nb_classes": 1, "data_path": root,
            **{f"{r}_list": p for r, p in paths.items()}}, ("auroc", ["Nodule"])


def covidx(root, shuffle):
    files = make_covidx(str(root), train=180, test=60, size=(64, 64))
    if shuffle is not None:
        _shuffle_lines(files["train"], lambda line: line.split()[-2],
                       lambda line, lab: " ".join([*line.split()[:-2], lab, line.split()[-1]]), shuffle)
    return {"dataset": "covidx", "nb_classes": 4, "data_path": root}, ("accuracy", None)


READERS = {"chestxray": nih, "csv": csv, "node21": node21, "covidx": covidx}
CHANCE = {"auroc": 0.5, "accuracy": 1 / 3}


def score(results: dict, metric: str, findings) -> float:
    if metric == "accuracy":
        return results["test"]["accuracy"]
    return float(np.mean([results["test"]["per_finding"][f]["auroc"] for f in findings]))


@pytest.mark.slow
@pytest.mark.parametrize("dataset", list(READERS))
def test_drawn_findings_are_learnt_and_shuffled_labels_are_not(tmp_path, dataset):
    """Learnt: the drawn findings score far above chance. Shuffled (the labels of the training and validation lists
    permuted among their images, as a misaligned reader would pair them): a model trained on labels independent of
    the images ranks the test images by a drawn feature with a random sign (AUROC is a ranking), so one shuffled run
    may land anywhere from 0 to 1, and several average out below the learnt score by a wide margin. A reader that
    misaligns labels makes the first run one of those."""
    scores = {}
    for shuffle in (None, *SHUFFLE_SEEDS):
        root = tmp_path / f"data_{shuffle}"
        flags, (metric, findings) = READERS[dataset](root, shuffle)
        out = tmp_path / f"out_{shuffle}"
        flags = {"model": "vit_debug_patch16", "input_size": 64, "batch_size": 8, "epochs": 10, "warmup_epochs": 1,
                 "blr": 0.03, "layer_decay": 1.0, "num_workers": 0, "device": "cpu", "bootstrap": 0,
                 "print_freq": 1000, "output_dir": out, "log_dir": out, **flags}
        assert ft_main.main(argv(flags)) == 0
        scores[shuffle] = score(json.loads((out / "results.json").read_text()), metric, findings)
    chance, shuffled = CHANCE[metric], float(np.mean([scores[s] for s in SHUFFLE_SEEDS]))
    assert scores[None] > chance + 0.25, scores  # learnt: far above chance
    assert shuffled < scores[None] - 0.25, scores  # shuffled: nothing learnt
