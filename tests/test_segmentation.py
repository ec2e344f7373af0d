"""Segmentation (main_segment_chestxray.py): SIIM-ACR's run-length masks, the three layouts and their splits,
augmentation that moves the mask with the image, the whole pre-trained U-Net (or its encoder alone) and MAE ViTs
under DPT, the protocol's outputs, learning on drawn masks, and bad input."""
import argparse
import hashlib
import json
import os
import re
import signal
import subprocess
import sys

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

import main_segment_chestxray as seg_main
import models_mae
import models_mae_cnn
import models_seg
from data import rle, segmentation
from data.labelled import label_fraction
from data.synthetic import make_lung_masks, make_siim, siim_image_id
from engine_segment import SegmentationTask
from tests.helpers import ROOT, argv, run_cli, run_main, spawn, wait_for_line
from util.args import validate_args
from util.checkpoint import load_checkpoint

FLAGS = {"input_size": 64, "batch_size": 4, "warmup_epochs": 0, "num_workers": 0, "device": "cpu",
         "print_freq": 50, "bootstrap": 20, "epochs": 1}


def seg_flags(data_path: str, out, **extra) -> list[str]:
    flags = {"model": "unet_resnet18", "data_path": data_path, **FLAGS, "output_dir": str(out), "log_dir": str(out),
             **extra}
    return argv(flags)


def run_segment(flags, caplog) -> tuple[int, str]:
    return run_main(seg_main.main, flags, caplog)


@pytest.fixture(scope="module")
def siim(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("siim"))
    make_siim(root, images=24, size=(64, 64))
    return root


@pytest.fixture(scope="module")
def lungs(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("lungs"))
    return make_lung_masks(root, images=40, size=(64, 64))


# ---- run-length encoding ------------------------------------------------------------------------------------------

def test_rle_decodes_the_siim_convention_as_written_by_hand():
    # a 3 x 4 image read column by column: pixels 1, 2 (column 0, rows 1-2), then a gap of 3 from the end of that
    # run: pixel 6 (column 2, row 0)
    by_hand = np.array([[0, 0, 1, 0],
                        [1, 0, 0, 0],
                        [1, 0, 0, 0]], dtype=bool)
    assert np.array_equal(rle.decode("1 2 3 1", 3, 4), by_hand)
    assert np.array_equal(rle.decode_rows(["1 2", "6 1"], 3, 4), by_hand)  # two regions, two rows, merged
    assert not rle.decode(" -1", 3, 4).any() and rle.decode("-1", 3, 4).shape == (3, 4)
    assert rle.encode(by_hand) == "1 2 3 1"
    assert rle.encode(np.zeros((3, 4))) == "-1"
    full = np.ones((2, 5), dtype=bool)
    assert rle.encode(full) == "0 10" and np.array_equal(rle.decode("0 10", 2, 5), full)


def test_rle_round_trips_random_masks():
    rng = np.random.default_rng(0)
    for trial in range(200):
        h, w = rng.integers(1, 40, size=2)
        mask = rng.random((h, w)) < rng.choice([0.0, 0.05, 0.5, 0.95, 1.0])
        assert np.array_equal(rle.decode(rle.encode(mask), h, w), mask), trial


@pytest.mark.parametrize("encoded, message", [
    ("10 5", "runs to pixel 15, past the 3x4 image"),
    ("1 2 3", "gap/length pairs"),
    ("1 -2", "negative gap"),
    ("1 x", "not an integer"),
])
def test_rle_refuses_what_is_not_a_mask_of_the_image(encoded, message):
    with pytest.raises(rle.RLEError, match=message):
        rle.decode(encoded, 3, 4)


# ---- layouts and splits -------------------------------------------------------------------------------------------

def split_args(data_path: str, out: str, **extra):
    return seg_main.get_args_parser().parse_args(seg_flags(data_path, out, **extra))


def test_siim_dicoms_split_by_patient_and_the_written_lists_come_back(siim, tmp_path):
    args = split_args(siim, str(tmp_path), dataset="siim")
    splits, drawn = segmentation.build_splits(args)
    assert drawn and sum(len(s) for s in splits.values()) == 24
    patients = {role: set(s.patients.tolist()) for role, s in splits.items()}
    assert all(len(p) < len(splits[role]) for role, p in patients.items())  # two images per PatientID
    assert not (patients["train"] & patients["val"]) and not (patients["train"] & patients["test"])
    # the merged rows of an image with two regions are one mask with both
    first = splits["train"] if siim_image_id(0) in splits["train"].names else (
        splits["val"] if siim_image_id(0) in splits["val"].names else splits["test"])
    i = first.names.index(siim_image_id(0))
    assert len(first.masks[i]) == 2
    image, mask = segmentation.load_pair(first, i)
    assert mask.shape == (image.height, image.width) and mask.any()
    for role, split in splits.items():
        split.write(str(tmp_path / f"seg_{role}.csv"))
    given = split_args(siim, str(tmp_path), dataset="siim", **{f"{r}_list": str(tmp_path / f"seg_{r}.csv")
                                                               for r in segmentation.ROLES})
    again, drawn = segmentation.build_splits(given)
    assert not drawn
    assert {r: s.names for r, s in again.items()} == {r: s.names for r, s in splits.items()}


def test_label_fraction_draws_whole_patients_and_its_list_comes_back(siim, tmp_path):
    splits, _ = segmentation.build_splits(split_args(siim, str(tmp_path), dataset="siim"))
    train = splits["train"]
    drawn = label_fraction(train, 0.5, 3, str(tmp_path), write=True, prefix="seg_train")
    path = tmp_path / "seg_train_50pct_seed3.csv"
    assert drawn.source == str(path) and path.is_file()
    kept = set(drawn.patients.tolist())
    assert len(drawn) >= len(train) / 2 and len(drawn) < len(train)
    assert all((p in kept) == (n in drawn.names) for p, n in zip(train.patients.tolist(), train.names))  # whole
    for role in ("val", "test"):
        splits[role].write(str(tmp_path / f"seg_{role}.csv"))
    given, _ = segmentation.build_splits(split_args(siim, str(tmp_path), dataset="siim", train_list=str(path),
                                                    val_list=str(tmp_path / "seg_val.csv"),
                                                    test_list=str(tmp_path / "seg_test.csv")))
    assert given["train"].names == drawn.names


def test_siim_png_conversions_are_each_their_own_patient(tmp_path):
    make_siim(str(tmp_path / "png"), images=20, size=(32, 32), dicom=False)
    splits, _ = segmentation.build_splits(split_args(str(tmp_path / "png"), str(tmp_path), dataset="siim"))
    for split in splits.values():
        assert len(set(split.patients.tolist())) == len(split)
    assert sorted(len(s) for s in splits.values()) == [2, 4, 14]


def test_folder_and_csv_layouts(lungs, tmp_path):
    splits, _ = segmentation.build_splits(split_args(lungs, str(tmp_path), dataset="folder", mask_suffix="_mask"))
    assert sum(len(s) for s in splits.values()) == 40
    rows = {role: pd.DataFrame({"image": [os.path.join("images", n) for n in s.names],
                                "mask": [os.path.relpath(m, lungs) for m in s.masks],
                                "patient": [f"p{i // 2}-{role}" for i in range(len(s))]})
            for role, s in splits.items()}
    for role, df in rows.items():
        df.to_csv(tmp_path / f"{role}.csv", index=False)
    args = split_args(lungs, str(tmp_path), dataset="csv", patient_column="patient",
                      **{f"{r}_list": str(tmp_path / f"{r}.csv") for r in segmentation.ROLES})
    from_csv, drawn = segmentation.build_splits(args)
    assert not drawn
    assert len(set(from_csv["train"].patients.tolist())) == (len(splits["train"]) + 1) // 2
    a, b = segmentation.load_pair(splits["test"], 0), segmentation.load_pair(from_csv["test"], 0)
    assert np.array_equal(np.asarray(a[0]), np.asarray(b[0])) and np.array_equal(a[1], b[1])


# ---- augmentation moves the mask with the image ------------------------------------------------------------------

def border(mask: torch.Tensor, width: int = 1) -> torch.Tensor:
    """Pixels within `width` of the mask's edge (where bilinear resizing of the image blurs it)."""
    m = mask.float()[None, None]
    size = 2 * width + 1
    grown = torch.nn.functional.max_pool2d(m, size, 1, width)
    shrunk = -torch.nn.functional.max_pool2d(-m, size, 1, width)
    return (grown != shrunk)[0, 0]


def test_crops_and_flips_move_the_mask_with_the_image():
    """An image whose bright pixels are exactly its mask (an asymmetric L shape): after every random crop, resize
    and flip, the transformed image thresholded at half brightness is the transformed mask everywhere but within a
    pixel of the mask's edge, which bilinear resizing blurs; the mask stays 0/1 (nearest neighbour)."""
    mask = np.zeros((96, 80), dtype=bool)
    mask[10:70, 8:24] = True
    mask[54:70, 8:60] = True
    image = Image.fromarray(mask.astype(np.uint8) * 200)
    transform = segmentation.PairTransform(48, [0.0], [1.0], 1, is_train=True, crop_scale=(0.3, 1.0),
                                           hflip_prob=0.5)
    flipped_agreement = []
    for seed in range(40):
        torch.manual_seed(seed)
        pixels, target = transform(image, mask)
        assert set(torch.unique(target).tolist()) <= {0.0, 1.0} and target.shape == (1, 48, 48)
        bright, truth = pixels[0] * 255 > 100, target[0] > 0
        assert not (bright != truth)[~border(truth)].any(), seed
        flipped_agreement.append(not (bright != truth.flip(-1))[~border(truth)].any())
    assert not all(flipped_agreement)  # the check can fail: a mask left unflipped would not pass


def test_evaluation_resizes_the_mask_with_nearest_neighbour():
    mask = np.zeros((64, 64), dtype=bool)
    mask[16:48, 8:24] = True
    pixels, target = segmentation.PairTransform(32, [0.0], [1.0], 1, is_train=False)(
        Image.fromarray(mask.astype(np.uint8) * 255), mask)
    assert torch.equal(target[0] > 0, torch.from_numpy(mask[::2, ::2]))


# ---- models: what a pre-trained checkpoint fills -----------------------------------------------------------------

@pytest.mark.slow  # fine-tuning runs, or the session's pre-training runs
def test_whole_pretrained_unet_loads_and_decoder_init_random_differs_exactly_in_the_decoder(runs):
    pretrained = load_checkpoint(runs["cnn"])["model"]  # a densenet121 U-Net pre-trained by this project
    torch.manual_seed(0)
    whole = models_seg.create_model("unet_densenet121", 64)
    initial = {k: v.clone() for k, v in whole.state_dict().items()}
    report = models_seg.load_pretrained(whole, load_checkpoint(runs["cnn"]))
    encoder, decoder, head = models_seg.encoder_and_decoder(whole)
    state = whole.state_dict()
    for key in encoder + decoder:
        assert torch.equal(state[key], pretrained["model." + key]), key
    assert sorted(report["new"]) == sorted(head) and not report["adapted"]
    assert all(torch.equal(state[k], initial[k]) for k in head)

    torch.manual_seed(0)
    encoder_only = models_seg.create_model("unet_densenet121", 64)
    report = models_seg.load_pretrained(encoder_only, load_checkpoint(runs["cnn"]), decoder_init="random")
    state = encoder_only.state_dict()
    assert all(torch.equal(state[k], pretrained["model." + k]) for k in encoder)
    assert all(torch.equal(state[k], initial[k]) for k in decoder + head)
    assert sorted(report["new"]) == sorted(decoder + head)
    float_decoder = [k for k in decoder if state[k].is_floating_point() and "running_var" not in k]
    assert any(not torch.equal(state[k], pretrained["model." + k]) for k in float_decoder)


@pytest.mark.slow  # fine-tuning runs, or the session's pre-training runs
def test_encoder_only_files_need_decoder_init_random(runs):
    encoder_state = load_checkpoint(runs["cnn"])["model"]
    encoder_file = {k.removeprefix("model.encoder."): v for k, v in encoder_state.items()
                    if k.startswith("model.encoder.")}  # the reference's densenet121_CXR_0.3M_mae.pth layout
    with pytest.raises(ValueError, match="holds no U-Net decoder.*--decoder_init random"):
        models_seg.load_pretrained(models_seg.create_model("unet_densenet121", 64), encoder_file)
    report = models_seg.load_pretrained(models_seg.create_model("unet_densenet121", 64, in_chans=1), encoder_file,
                                        decoder_init="random")
    assert report["adapted"] == ["encoder.features.conv0.weight (channels 3 -> 1)"]
    with pytest.raises(ValueError, match="pre-trained a FPN"):
        models_seg.load_pretrained(models_seg.create_model("unet_densenet121", 64),
                                   {"model": encoder_state, "args": {"model": "densenet121", "model_arch": "FPN"}})
    with pytest.raises(ValueError, match="needs resnet18: pass --model unet_densenet121"):
        models_seg.load_pretrained(models_seg.create_model("unet_resnet18", 64), load_checkpoint(runs["cnn"]))


def test_imagenet_baselines_load_from_local_files():
    """The baselines' weights as users save them: torchvision's DenseNet-121 state dict (its classifier ignored) fills
    the U-Net's encoder; timm's ViT-S state dict fills the DPT's ViT."""
    import timm
    import torchvision

    torchvision_state = torchvision.models.densenet121().state_dict()
    unet = models_seg.create_model("unet_densenet121", 64)
    report = models_seg.load_pretrained(unet, torchvision_state, decoder_init="random")
    assert report["ignored"] == ["classifier.weight", "classifier.bias"]
    state = unet.state_dict()
    assert all(torch.equal(state[f"encoder.{k}"], v) for k, v in torchvision_state.items() if k.startswith("features"))
    timm_state = timm.create_model("vit_small_patch16_224", pretrained=False).state_dict()
    dpt = models_seg.create_model("dpt_vit_small_patch16", 224)
    report = models_seg.load_pretrained(dpt, timm_state, decoder_init="random")
    vit = dpt.encoder.model.state_dict()
    assert all(torch.equal(vit[k], v) for k, v in timm_state.items() if k.startswith("blocks."))
    assert {"head.weight", "norm.weight"} <= set(report["ignored"])


def test_mae_vit_fills_every_block_of_the_dpt_encoder():
    torch.manual_seed(0)
    mae = models_mae.MODELS.get("mae_vit_debug_patch16")(img_size=32)
    model = models_seg.create_model("dpt_vit_debug_patch16", 64)
    report = models_seg.load_pretrained(model, {"model": mae.state_dict()}, decoder_init="random")
    vit = model.encoder.model.state_dict()
    for key, value in mae.state_dict().items():
        if key.startswith(("decoder", "mask_token", "norm.")):  # DPT reads the blocks: no final norm
            assert key in report["ignored"]
            continue
        if key == "pos_embed":
            assert vit[key].shape[1] == 1 + 16 and value.shape[1] == 1 + 4  # resampled from 32 to 64 pixels
            continue
        assert torch.equal(vit[key], value), key
    assert report["adapted"] and all(k.startswith(("decoder.", "segmentation_head.")) for k in report["new"])
    assert model(torch.randn(2, 3, 64, 64)).shape == (2, 1, 64, 64)
    with pytest.raises(ValueError, match="--decoder_init random"):
        models_seg.load_pretrained(model, {"model": mae.state_dict()})


# ---- the run --------------------------------------------------------------------------------------------------------

@pytest.mark.slow  # fine-tuning runs, or the session's pre-training runs
def test_siim_run_writes_every_output_and_a_rerun_is_complete(siim, runs, tmp_path, caplog):
    out = tmp_path / "run"
    code, text = run_segment(seg_flags(siim, out, model="unet_densenet121", finetune=runs["cnn"], dataset="siim",
                                       epochs=2), caplog)
    assert code == 0, text
    assert "loaded 360 tensors" in text or "loaded" in text
    results = json.loads((out / "results.json").read_text())
    test = results["test"]
    assert test["images"] == 4 and test["images_with_empty_mask"] == 2 and test["empty_prediction_baseline"] == 0.5
    table = pd.read_csv(out / "test_metrics.csv")
    assert len(table) == 4 and np.isclose(table["dice"].mean(), test["mean_dice"])
    assert set(results["pretrained_keys"]["new"]) == {"segmentation_head.0.weight", "segmentation_head.0.bias"}
    for name in ("overlays_best.png", "overlays_worst.png", "val_dice.png", "seg_train.csv", "checkpoint-best.pth"):
        assert (out / name).is_file(), name
    assert results["selected_epoch"] in (0, 1) and len(results["val_history"]) == 2
    before = hashlib.md5((out / "results.json").read_bytes()).hexdigest()
    code, text = run_segment(seg_flags(siim, out, model="unet_densenet121", finetune=runs["cnn"], dataset="siim",
                                       epochs=2), caplog)
    assert code == 0 and "this run is complete" in text
    assert hashlib.md5((out / "results.json").read_bytes()).hexdigest() == before
    excluded = tmp_path / "exclude_list.txt"  # as tools.find_duplicates writes it: one path a line
    first_test = pd.read_csv(out / "seg_test.csv")["image"].iloc[0]
    excluded.write_text(next(str(p) for p in __import__("pathlib").Path(siim).rglob(first_test + ".dcm")) + "\n")
    apart = tmp_path / "apart"
    code, text = run_segment(seg_flags(siim, apart, model="unet_densenet121", dataset="siim", eval=True,
                                       resume=str(out / "checkpoint-best.pth"), exclude_list=str(excluded),
                                       **{f"{r}_list": str(out / f"seg_{r}.csv") for r in segmentation.ROLES}),
                             caplog)
    assert code == 0, text
    kept = json.loads((apart / "results.json").read_text())["test"]
    assert kept["images"] == 3 and kept["excluded"]["names"] == [first_test]
    alone = pd.read_csv(apart / "test_metrics_excluded.csv")
    assert list(alone["image"]) == [first_test] and alone["dice"][0] == pytest.approx(table["dice"][0])
    assert kept["mean_dice"] == pytest.approx(table["dice"][1:].mean())
    holds_results = tmp_path / "copied_results"  # results without a run (a run's folder is refused before)
    holds_results.mkdir()
    (holds_results / "results.json").write_text((out / "results.json").read_text())
    before = tree_md5(holds_results)
    code, text = run_segment(seg_flags(siim, holds_results, model="unet_densenet121", dataset="siim", eval=True,
                                       resume=str(out / "checkpoint-best.pth")), caplog)
    assert code == 1 and f"--eval: {holds_results} already holds results.json; give the evaluation" in text, text
    assert tree_md5(holds_results) == before  # refused before anything was written there
    evaluated = tmp_path / "eval"
    code, text = run_segment(seg_flags(siim, evaluated, model="unet_densenet121", dataset="siim", eval=True,
                                       resume=str(out / "checkpoint-best.pth"),
                                       **{f"{r}_list": str(out / f"seg_{r}.csv") for r in segmentation.ROLES}),
                             caplog)
    assert code == 0, text
    again = json.loads((evaluated / "results.json").read_text())["test"]
    assert again["mean_dice"] == pytest.approx(test["mean_dice"])


@pytest.mark.slow  # fine-tuning runs, or the session's pre-training runs
def test_short_runs_learn_drawn_lungs_with_the_whole_unet_and_the_encoder_alone(lungs, runs, tmp_path, caplog):
    """Drawn lung fields (make_lung_masks): twelve short epochs take the test Dice (about 0.85 here) far above the
    empty-mask baseline (0, every image has lungs), from the whole pre-trained U-Net and from its encoder alone."""
    for decoder_init in ("pretrained", "random"):
        out = tmp_path / decoder_init
        code, text = run_segment(seg_flags(lungs, out, model="unet_densenet121", finetune=runs["cnn"],
                                           dataset="folder", mask_suffix="_mask", decoder_init=decoder_init,
                                           epochs=12, blr=3e-2, batch_size=8), caplog)
        assert code == 0, text
        test = json.loads((out / "results.json").read_text())["test"]
        assert test["empty_prediction_baseline"] == 0.0
        assert test["mean_dice"] > 0.7, (decoder_init, test["mean_dice"])


@pytest.mark.slow  # fine-tuning runs, or the session's pre-training runs
def test_two_ranks_score_every_test_image_once_as_one_process_does(lungs, tmp_path, free_port, caplog):
    """torchrun, 2 processes: the test images are split between the ranks and gathered, so the per-image table of a
    checkpoint scored by two ranks equals the one-process table (same images, same Dice)."""
    two = tmp_path / "two"
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={free_port}"]
    run_cli([*torchrun, "main_segment_chestxray.py", *seg_flags(lungs, two, dataset="folder", mask_suffix="_mask",
                                                                   epochs=1, input_size=32)], timeout=600)
    results = json.loads((two / "results.json").read_text())
    assert results["world_size"] == 2
    one = tmp_path / "one"
    code, text = run_segment(seg_flags(lungs, one, dataset="folder", mask_suffix="_mask", eval=True, input_size=32,
                                       resume=str(two / "checkpoint-best.pth"),
                                       **{f"{r}_list": str(two / f"seg_{r}.csv") for r in segmentation.ROLES}), caplog)
    assert code == 0, text
    a, b = pd.read_csv(two / "test_metrics.csv"), pd.read_csv(one / "test_metrics.csv")
    assert list(a["image"]) == list(b["image"]) and len(a) == results["test"]["images"]
    np.testing.assert_allclose(a["dice"], b["dice"], atol=1e-6)


@pytest.mark.slow  # three processes
def test_preempted_run_resumes_to_the_weights_of_an_uninterrupted_one(lungs, tmp_path):
    """SIGTERM mid-epoch: checkpoint-last and exit 3; the same command resumes there, and the random crops and
    flips of the resumed epoch are the interrupted one's, so the final weights equal an uninterrupted run's."""
    def flags(out):
        return [*seg_flags(lungs, out, dataset="folder", mask_suffix="_mask", epochs=2, input_size=32,
                           batch_size=2, print_freq=1, bootstrap=0), "--deterministic"]

    script = str(ROOT / "main_segment_chestxray.py")
    run_cli([sys.executable, script, *flags(tmp_path / "straight")], timeout=300)
    proc = spawn([sys.executable, script, *flags(tmp_path / "cut")])
    wait_for_line(proc, r"Epoch: \[1\]\s+\[\s*3/")
    proc.send_signal(signal.SIGTERM)
    first = proc.communicate(timeout=120)[0]
    assert proc.returncode == 3, first
    resumed = run_cli([sys.executable, script, *flags(tmp_path / "cut")], timeout=300)
    assert re.search(r"resumed from .*checkpoint-last.pth: epoch 1, step [1-9]", resumed.stdout), resumed.output
    a, b = (load_checkpoint(str(tmp_path / run / "checkpoint-last.pth"))["model"] for run in ("straight", "cut"))
    assert all(torch.equal(a[k], b[k]) for k in a), "the resumed run's weights differ"
    assert (json.loads((tmp_path / "cut" / "results.json").read_text())["test"]["mean_dice"]
            == json.loads((tmp_path / "straight" / "results.json").read_text())["test"]["mean_dice"])


# ---- bad input ----------------------------------------------------------------------------------------------------

def tree_md5(folder) -> dict:
    return {str(p): hashlib.md5(p.read_bytes()).hexdigest() for p in sorted(folder.rglob("*")) if p.is_file()}


def bad_lungs(tmp_path, edit) -> str:
    root = make_lung_masks(str(tmp_path / "lungs"), images=12, size=(32, 32))
    edit(root)
    return root


def replace_mask(name: str, pixels: np.ndarray):
    def edit(root):
        Image.fromarray(pixels).save(os.path.join(root, "masks", name))
    return edit


def delete_dicom(root):
    for folder, _, files in os.walk(root):
        for f in files:
            if f == siim_image_id(3) + ".dcm":
                os.remove(os.path.join(folder, f))


def rle_past_the_end(root):
    path = os.path.join(root, "train-rle.csv")
    df = pd.read_csv(path, dtype=str)
    df.iloc[1, 1] = " 4000 200"
    df.to_csv(path, index=False)


BAD_INPUT = [
    ("a mask of another size than its image", "folder",
     lambda tmp: bad_lungs(tmp, replace_mask("cxr_0001_mask.png", np.zeros((16, 32), np.uint8))),
     r"mask \S+cxr_0001_mask.png is 32x16 but its image \S+cxr_0001.png is 32x32"),
    ("a mask with values other than 0/255 or 0/1", "folder",
     lambda tmp: bad_lungs(tmp, replace_mask("cxr_0002_mask.png", np.full((32, 32), 128, np.uint8))),
     r"mask \S+cxr_0002_mask.png holds the values \[128\]; a binary mask holds 0/1 or 0/255"),
    ("an RGB mask", "folder",
     lambda tmp: bad_lungs(tmp, lambda root: Image.new("RGB", (32, 32)).save(
         os.path.join(root, "masks", "cxr_0003_mask.png"))),
     r"mask \S+cxr_0003_mask.png: mode RGB"),
    ("an image without a mask", "folder",
     lambda tmp: bad_lungs(tmp, lambda root: os.remove(os.path.join(root, "masks", "cxr_0004_mask.png"))),
     r"1 image\(s\) of \S+images have no mask in \S+masks named <stem>_mask.<ext>, e.g. \['cxr_0004.png'\]"),
    ("a run past the image in train-rle.csv", "siim",
     lambda tmp: (make_siim(str(tmp / "siim"), images=12, size=(32, 32)), rle_past_the_end(str(tmp / "siim")))
     and str(tmp / "siim"),
     r"train-rle.csv, ImageId \S+: EncodedPixels runs to pixel 4200, past the 32x32 image"),
    ("a missing DICOM", "siim",
     lambda tmp: (make_siim(str(tmp / "siim"), images=12, size=(32, 32)), delete_dicom(str(tmp / "siim")))
     and str(tmp / "siim"),
     r"\S+train-rle.csv: 1 ImageId\(s\) have no image below \S+ \(looked for <ImageId>.dcm or .png\), e.g. \['"
     + siim_image_id(3).replace(".", r"\.") + "'"),
]


@pytest.mark.slow  # a dataset written and checked per case
@pytest.mark.parametrize("case, dataset, make, message", BAD_INPUT, ids=[c[0] for c in BAD_INPUT])
def test_bad_input_is_a_clear_error_before_training(case, dataset, make, message, tmp_path, caplog):
    data_path = make(tmp_path)
    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.txt").write_text("kept")
    before = tree_md5(out)
    code, text = run_segment(seg_flags(data_path, out, dataset=dataset, mask_suffix="_mask", check_images="all",
                                       input_size=32), caplog)
    assert code == 1, text
    assert __import__("re").search(message, text), text
    assert "Epoch: [0]" not in text and not list(out.glob("checkpoint-*"))
    assert {k: v for k, v in tree_md5(out).items() if k in before} == before


@pytest.mark.parametrize("flags, message", [
    ({"model": "unet_densenet12"}, "'densenet12' is not an SMP encoder"),
    ({"input_size": 48}, "--input_size 48: segmentation models need a multiple of 32"),
    ({"model": "dpt_vit_debug_patch16", "finetune": "x.pth"}, "--decoder_init pretrained: an MAE checkpoint holds no "
                                                             "decoder"),
    ({"drop_path": 0.1}, "stochastic depth is for ViT encoders"),
    ({"train_list": "a.csv"}, "--train_list given alone"),
    ({"dataset": "csv"}, "--dataset csv needs --train_list, --val_list and --test_list"),
])
def test_bad_flags_are_refused_before_anything_runs(flags, message, lungs, tmp_path, caplog):
    code, text = run_segment(seg_flags(lungs, tmp_path / "out", **{"dataset": "folder", "mask_suffix": "_mask",
                                                                   **flags}), caplog)
    assert code == 1 and message in text, text
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("recipe, model", [("segment_unet", "unet_densenet121"), ("segment_vit_s",
                                                                               "dpt_vit_small_patch16")])
def test_slurm_recipes_parse_and_pass_every_check(recipe, model):
    show = 'source scripts/recipes.sh && printf "%s\\n" "$SCRIPT" "${RECIPE_ARGS[@]}"'
    env = {**os.environ, "RECIPE": recipe, "PRETRAINED": "w.pth", "DATASET": "folder", "MASK_SUFFIX": "_mask"}
    out = subprocess.run(["bash", "-c", show], cwd=ROOT, env=env, capture_output=True, text=True,
                         check=True).stdout.splitlines()
    assert out[0] == "main_segment_chestxray.py"
    args = argparse.ArgumentParser(parents=[seg_main.get_args_parser()]).parse_args(out[1:])
    assert (args.model, args.dataset, args.mask_suffix, args.device) == (model, "folder", "_mask", "cuda")
    validate_args(args, SegmentationTask(seg_main.build_segmenter, seg_main.check_model_args).check_args(args))


def test_model_list_names_unets_and_dpts(capsys):
    assert seg_main.main(["--model", "list"]) == 0
    names = capsys.readouterr().out.split()
    assert "unet_densenet121" in names and "dpt_vit_small_patch16" in names
    assert all(models_mae_cnn.encoder_names()[0] in n or n.startswith(("unet_", "dpt_")) for n in names)
