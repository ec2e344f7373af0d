"""--dataset node21: NODE21's processed release (metadata.csv with a row per nodule box, MetaImage radiographs read
with SimpleITK), image-level labels merged from the boxes, the seeded split written to output_dir and given back,
and its bad inputs."""
import argparse
import json
import os
import re

import numpy as np
import pandas as pd
import pytest
import SimpleITK as sitk
import torch

import main_finetune_chestxray as ft_main
from data import labelled, node21
from data.image_io import load_gray
from data.synthetic import make_node21
from tests.helpers import argv


def node21_flags(root, out, **extra) -> list[str]:
    flags = {"dataset": "node21", "nb_classes": 1, "data_path": root, "model": "vit_debug_patch16", "input_size": 32,
             "batch_size": 4, "epochs": 2, "warmup_epochs": 0, "num_workers": 0, "device": "cpu", "print_freq": 50,
             "bootstrap": 20, "output_dir": str(out), "log_dir": str(out), **extra}
    return argv(flags)


def parse(flags):
    return argparse.ArgumentParser(parents=[ft_main.get_args_parser()]).parse_args(flags)


def test_boxes_merge_into_one_label_per_image_and_the_split_is_seeded(tmp_path):
    """An image with two nodule rows is one positive image; a control's row is a negative; names without an
    extension find their .mha; the random split is 70/10/20 of the images, the same for the same seed."""
    metadata = make_node21(str(tmp_path), images=40, size=(32, 32), extension=False)
    rows = pd.read_csv(metadata, dtype=str)
    assert len(rows) == 45 and rows["img_name"].nunique() == 40  # 5 images with two boxes
    merged = node21.read_metadata(metadata, "--data_path")
    label = dict(zip(merged["img_name"], merged["label"]))
    assert label["n0000"] == 1 and label["c0001"] == 0 and sum(label.values()) == 20
    splits = labelled.build_splits(parse(node21_flags(tmp_path, tmp_path / "out")))
    assert [len(splits[r]) for r in ("train", "val", "test")] == [28, 4, 8] and splits["test"].labels is None
    for split in (splits["train"], splits["val"]):
        for path, value in zip(split.paths, split.labels[:, 0]):
            assert label[os.path.basename(path.decode()).removesuffix(".mha")] == value
    again = labelled.build_splits(parse(node21_flags(tmp_path, tmp_path / "out", fraction_seed=0)))
    other = labelled.build_splits(parse(node21_flags(tmp_path, tmp_path / "out", fraction_seed=1)))
    assert np.array_equal(again["test"].paths, splits["test"].paths)
    assert not np.array_equal(other["test"].paths, splits["test"].paths)


def test_metaimages_decode_windowed_and_a_volume_is_refused(tmp_path):
    ramp = (np.arange(64 * 64).reshape(64, 64) % 4096).astype(np.int16)
    sitk.WriteImage(sitk.GetImageFromArray(ramp), str(tmp_path / "ramp.mha"))
    image = np.asarray(load_gray(str(tmp_path / "ramp.mha")))
    assert image.shape == (64, 64) and image.min() == 0 and image.max() == 255  # windowed, not clipped to white
    sitk.WriteImage(sitk.GetImageFromArray(np.zeros((3, 8, 8), np.int16)), str(tmp_path / "volume.mha"))
    with pytest.raises(Exception, match=r"volume.mha: MetaImage of shape \[3, 8, 8\]: expected one 2-D"):
        load_gray(str(tmp_path / "volume.mha"))


@pytest.mark.slow
def test_node21_fine_tuning_writes_its_split_and_takes_it_back(tmp_path):
    """A run writes node21_{train,val,test}.csv; given back as lists they are the same split, and the drawn-in
    nodules are learnt (test AUROC well above chance)."""
    root = tmp_path / "node21"
    make_node21(str(root), images=80, size=(32, 32))
    out = tmp_path / "out"
    assert ft_main.main(node21_flags(root, out, epochs=8, blr=0.01)) == 0
    results = json.loads((out / "results.json").read_text())
    assert results["findings"] == ["Nodule"] and results["test"]["images"] == 16
    assert results["test"]["per_finding"]["Nodule"]["auroc"] > 0.75, results["test"]
    lists = {role: out / f"node21_{role}.csv" for role in ("train", "val", "test")}
    drawn = labelled.build_splits(parse(node21_flags(root, out)))
    given = labelled.build_splits(parse(node21_flags(root, tmp_path / "again", **{
        f"{role}_list": path for role, path in lists.items()})))
    for role in lists:
        assert np.array_equal(given[role].paths, drawn[role].paths)
    names = tmp_path / "test_names.txt"  # a list of names takes its labels from metadata.csv
    names.write_text("".join(n + "\n" for n in pd.read_csv(lists["test"])["img_name"]))
    by_name = labelled.build_splits(parse(node21_flags(root, tmp_path / "again", train_list=lists["train"],
                                                       val_list=lists["val"], test_list=names)))
    assert np.array_equal(by_name["test"].paths, drawn["test"].paths)


def _rewrite(root, edit) -> None:
    path = os.path.join(root, "metadata.csv")
    lines = open(path).read().splitlines()
    with open(path, "w") as f:
        f.write("".join(line + "\n" for line in edit(lines)))


NODE21_BAD = [
    ("a missing metadata.csv", lambda root, t: os.remove(os.path.join(root, "metadata.csv")), {},
     r"--data_path: \S+metadata.csv not found; --data_path must hold NODE21's metadata.csv and images/"),
    ("a wrong column", lambda root, t: _rewrite(root, lambda ls: [ls[0].replace("label", "nodule"), *ls[1:]]), {},
     r"\S+metadata.csv lacks the column\(s\) \['label'\]"),
    ("an unknown label", lambda root, t: _rewrite(root, lambda ls: [ls[0], ls[1].rsplit(",", 1)[0] + ",yes", *ls[2:]]),
     {}, r"\S+metadata.csv, row 1, column 'label': 'yes'; every label must be 0 \(no nodule\) or 1"),
    ("a missing image", lambda root, t: os.remove(os.path.join(root, "images", "c0001.mha")), {},
     r"of the \w+ list metadata.csv, a random \w+ share .* are missing:\s+\S+c0001.mha"),
    ("a list name not in metadata.csv", lambda root, t: (t / "test.txt").write_text("x9999.mha\n"),
     {"train_list": "TRAIN", "val_list": "VAL", "test_list": "TEST_TXT"},
     r"--test_list \S+test.txt: 1 image\(s\) are not in metadata.csv, e.g. \['x9999.mha'\]"),
    ("an empty test list", lambda root, t: (t / "test.csv").write_text("img_name,label\n"),
     {"train_list": "TRAIN", "val_list": "VAL", "test_list": "TEST_CSV"}, r"--test_list \S+test.csv lists no image"),
    ("an image in training and test", lambda root, t: (t / "test.csv").write_text("img_name,label\nn0000.mha,1\n"),
     {"train_list": "TRAIN", "val_list": "VAL", "test_list": "TEST_CSV"},
     r"the train list \(\S+train.csv\) and the test list \(\S+test.csv\) share 1 patient\(s\), e.g. n0000.mha"),
    ("one list of three", lambda root, t: None, {"test_list": "TEST_CSV"},
     r"--dataset node21 takes --train_list and --test_list \(the reference's `fname label` lists; --val_list "
     r"optional\) or all three lists of metadata.csv's images, or none"),
]


@pytest.mark.parametrize("case, damage, lists, message", NODE21_BAD, ids=[c[0] for c in NODE21_BAD])
def test_node21_bad_input_is_named_before_training(tmp_path, caplog, case, damage, lists, message):
    root = tmp_path / "node21"
    make_node21(str(root), images=16, size=(32, 32))
    pd.DataFrame({"img_name": ["n0000.mha", "c0001.mha"], "label": [1, 0]}).to_csv(tmp_path / "train.csv", index=False)
    pd.DataFrame({"img_name": ["n0002.mha", "c0003.mha"], "label": [1, 0]}).to_csv(tmp_path / "val.csv", index=False)
    damage(str(root), tmp_path)
    paths = {"TRAIN": tmp_path / "train.csv", "VAL": tmp_path / "val.csv", "TEST_TXT": tmp_path / "test.txt",
             "TEST_CSV": tmp_path / "test.csv"}
    out = tmp_path / "out"
    assert ft_main.main(node21_flags(root, out, **{k: paths[v] for k, v in lists.items()})) == 1
    assert re.search(message, caplog.text), caplog.text
    assert "Epoch: [0]" not in caplog.text and not (out / "checkpoint-last.pth").exists()


def test_node21_takes_two_logits_or_one(tmp_path):
    with pytest.raises(SystemExit, match=r"--nb_classes 14: --dataset node21 takes --nb_classes 2 \(two logits, "
                                         r"cross-entropy: no nodule, nodule\) or --nb_classes 1"):
        ft_main.main(node21_flags(tmp_path, tmp_path / "out", nb_classes=14))
    with pytest.raises(SystemExit, match=r"--loss_func bce: the loss follows the task here, ce for this one"):
        ft_main.main(node21_flags(tmp_path, tmp_path / "out", nb_classes=2, loss_func="bce"))
    args = parse(node21_flags(tmp_path, tmp_path / "out", nb_classes=1, loss_func="bce"))
    assert labelled.findings(args) == ["Nodule"] and not labelled.is_single_label(args)
    args = parse(node21_flags(tmp_path, tmp_path / "out", nb_classes=2))
    assert labelled.findings(args) == ["no nodule", "nodule"] and labelled.is_single_label(args)


def test_the_reference_lists_at_nodes21_size_with_validation_held_out_of_training(tmp_path):
    """train_mae.txt and test_mae.txt (`fname label` lines, the reference's interface) at NODE21's 4,882 images
    (hard links make it cheap): used whenever they are in --data_path, 10% of the training images held out for
    validation with --fraction_seed, and the labels are the files' (metadata.csv is not read for them)."""
    root = tmp_path / "node21"
    make_node21(str(root), images=10, size=(32, 32))
    names = [f"{'n' if k % 2 == 0 else 'c'}{k:04d}.mha" for k in range(4882)]
    for k, name in enumerate(names[10:], start=10):
        os.link(root / "images" / names[k % 10], root / "images" / name)
    (root / "train_mae.txt").write_text("".join(f"{n} {int(n[0] == 'n')}\n" for n in names[:3906]))
    (root / "test_mae.txt").write_text("".join(f"{n} {int(n[0] == 'n')}\n" for n in names[3906:]))
    os.remove(root / "metadata.csv")  # the reference's lists need no metadata.csv
    args = parse(node21_flags(root, tmp_path / "out", nb_classes=2, check_images="none"))
    splits = labelled.build_splits(args)
    assert [len(splits[r]) for r in ("train", "val", "test")] == [3515, 391, 976]
    assert splits["val"].write_as == "node21_val.txt" and splits["test"].labels is None
    assert splits["train"].labels.dtype == np.int64  # two logits: class indices
    for split in (splits["train"], splits["val"]):
        for path, label in zip(split.paths, split.labels):
            assert label == int(os.path.basename(path.decode())[0] == "n")
    one_logit = labelled.build_splits(parse(node21_flags(root, tmp_path / "out", nb_classes=1, loss_func="bce",
                                                         check_images="none")))
    assert one_logit["train"].labels.shape == (3515, 1)
    assert np.array_equal(one_logit["val"].paths, splits["val"].paths)  # the same held-out share


@pytest.mark.slow
def test_node21_two_logits_learn_and_the_written_lists_come_back(tmp_path):
    root = tmp_path / "node21"
    make_node21(str(root), images=80, size=(32, 32), reference_lists=True)
    out = tmp_path / "out"
    assert ft_main.main(node21_flags(root, out, nb_classes=2, epochs=8, blr=0.01)) == 0
    results = json.loads((out / "results.json").read_text())
    assert results["kind"] == "single-label" and results["classes"] == ["no nodule", "nodule"]
    assert results["test"]["images"] == 16 and results["test"]["auroc"]["nodule"] > 0.75, results["test"]
    written = {role: out / f"node21_{role}.txt" for role in ("train", "val")}
    assert all(p.is_file() for p in written.values())
    given = labelled.build_splits(parse(node21_flags(root, tmp_path / "again", nb_classes=2,
                                                     train_list=written["train"], val_list=written["val"])))
    drawn = labelled.build_splits(parse(node21_flags(root, tmp_path / "again", nb_classes=2)))
    for role in ("train", "val", "test"):
        assert np.array_equal(given[role].paths, drawn[role].paths)


@pytest.mark.parametrize("line, message", [
    ("n0000.mha 2", r"test_mae.txt, line 1: label '2'; every label must be 0 \(no nodule\) or 1"),
    ("n0000.mha 1 extra", r"test_mae.txt, line 1: expected `fname label` on every line"),
    ("x9999.mha 1", r"of the test list \S+test_mae.txt are missing:\s+\S+x9999.mha"),
])
def test_the_reference_lists_bad_input_is_named(tmp_path, caplog, line, message):
    root = tmp_path / "node21"
    make_node21(str(root), images=20, size=(32, 32), reference_lists=True)
    lines = (root / "test_mae.txt").read_text().splitlines()
    (root / "test_mae.txt").write_text("\n".join([line, *lines[1:]]) + "\n")
    out = tmp_path / "out"
    assert ft_main.main(node21_flags(root, out, nb_classes=2)) == 1
    assert re.search(message, caplog.text), caplog.text
    assert not (out / "checkpoint-last.pth").exists()


@pytest.mark.parametrize("damage, message", [
    (lambda root: os.remove(root / "test_mae.txt"),
     r"--data_path holds \S+train_mae.txt but not \S+test_mae.txt: the reference's lists come as a pair"),
    (lambda root: os.remove(root / "train_mae.txt"),
     r"--data_path holds \S+test_mae.txt but not \S+train_mae.txt: the reference's lists come as a pair"),
    (lambda root: (root / "test_mae.txt").write_text(""), r"--test_list \S+test_mae.txt lists no image"),
    (lambda root: (root / "test_mae.txt").write_text((root / "train_mae.txt").read_text().splitlines()[0] + "\n"),
     r"the train list \(\S+train_mae.txt minus the validation images\) and the test list \(\S+test_mae.txt\) share 1 "
     r"patient\(s\)"),
], ids=["no test_mae.txt", "no train_mae.txt", "an empty test_mae.txt", "an image in train_mae.txt and test_mae.txt"])
def test_the_reference_lists_missing_empty_or_shared_are_named(tmp_path, caplog, damage, message):
    """One file of the pair alone is refused (the fixture also has metadata.csv, which it would otherwise fall back to
    without a word), as are an empty list and an image in both lists."""
    root = tmp_path / "node21"
    make_node21(str(root), images=20, size=(32, 32), reference_lists=True)
    damage(root)
    out = tmp_path / "out"
    assert ft_main.main(node21_flags(root, out, nb_classes=2)) == 1
    assert re.search(message, caplog.text), caplog.text
    assert "Epoch: [0]" not in caplog.text and not (out / "checkpoint-last.pth").exists()


@pytest.mark.filterwarnings("error")
def test_the_labels_are_a_writable_copy_of_the_lists(tmp_path):
    """pandas hands out read-only label arrays; torch warns (undefined behaviour on a write) unless they are copied."""
    root = tmp_path / "node21"
    make_node21(str(root), images=20, size=(32, 32), reference_lists=True)
    splits = labelled.build_splits(parse(node21_flags(root, tmp_path / "out", nb_classes=2)))
    dataset = labelled.LabelledDataset(splits["train"], transform=None, dataset="node21")
    assert dataset.labels.dtype == torch.int64 and dataset.labels.tolist() == splits["train"].labels.tolist()
