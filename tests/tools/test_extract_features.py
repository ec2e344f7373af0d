"""tools/extract_features: one embedding per image, resumable, with a fingerprint that changes with the weights or
the preprocessing and with nothing else."""
import json
import os

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

import tools.extract_features as extract_tool
from data.synthetic import chest_image, save_png16, write_dicom
from data.transforms import build_eval_transform
from tests.helpers import run_tool_in_process
from tools.checkpoint_model import model_from_checkpoint


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> str:
    """Eleven images of the kinds pre-training reads: 8-bit PNG, JPEG, 16-bit PNG and DICOM, in two folders."""
    root = tmp_path_factory.mktemp("images")
    (root / "a").mkdir()
    for k in range(8):
        Image.fromarray(chest_image(48, 40, seed=k)).save(root / "a" / f"img{k}.png")
    Image.fromarray(chest_image(48, 40, seed=8)).save(root / "b.jpg", quality=95)
    save_png16(str(root / "c16.png"), chest_image(48, 40, seed=9), full_range=True)
    write_dicom(str(root / "d.dcm"), chest_image(48, 40, seed=10).astype(np.uint16) * 16)
    return str(root)


def extract(*args):
    return run_tool_in_process("extract_features.py", *args)


def test_features_are_the_encoders_and_the_index_names_each_image(runs, images, tmp_path):
    proc = extract("--checkpoint", runs["vit"], "--data", images, "--out", str(tmp_path / "f"), "--pool", "both",
                   "--batch_size", "4", "--num_workers", "0")
    assert proc.returncode == 0, proc.stderr
    features = np.load(tmp_path / "f.npy")
    index = pd.read_csv(tmp_path / "f.csv")
    sidecar = json.loads((tmp_path / "f.json").read_text())
    assert features.shape == (11, 128) and sidecar["shape"] == [11, 128] and len(index) == 11
    assert list(index["row"]) == list(range(11)) and index["image"].iloc[-1].endswith("d.dcm")
    model, _, _ = model_from_checkpoint(runs["vit"])
    transform = build_eval_transform(64, [0.5056] * 3, [0.252] * 3, 3)
    from data.image_io import load_gray
    batch = torch.stack([transform(load_gray(p)) for p in index["image"]])
    with torch.no_grad():
        tokens = model.forward_features(batch)
    np.testing.assert_allclose(features[:, :64], tokens[:, 0].numpy(), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(features[:, 64:], tokens[:, 1:].mean(1).numpy(), rtol=1e-5, atol=1e-5)
    assert not any(p.name.endswith((".partial.npy", ".progress.json")) for p in tmp_path.iterdir())


def test_fingerprint_changes_with_weights_or_preprocessing_and_nothing_else(runs, images, tmp_path):
    def fingerprint(name, *extra, checkpoint=runs["vit"]):
        proc = extract("--checkpoint", checkpoint, "--data", images, "--out", str(tmp_path / name),
                       "--num_workers", "0", *extra)
        assert proc.returncode == 0, proc.stderr
        return json.loads((tmp_path / f"{name}.json").read_text())

    first = fingerprint("first")
    again = fingerprint("again", "--batch_size", "3")  # another batch size, the same features
    assert again["fingerprint"] == first["fingerprint"]
    assert np.array_equal(np.load(tmp_path / "first.npy"), np.load(tmp_path / "again.npy"))
    other_weights = fingerprint("w", checkpoint=runs["vit_npl"])
    assert other_weights["fingerprint_parts"]["weights"] != first["fingerprint_parts"]["weights"]
    changed = fingerprint("norm", "--norm_stats", "imagenet")
    assert changed["fingerprint_parts"]["preprocessing"] != first["fingerprint_parts"]["preprocessing"]
    assert changed["fingerprint_parts"]["weights"] == first["fingerprint_parts"]["weights"]
    assert changed["fingerprint"] != first["fingerprint"]
    unet = fingerprint("unet64", checkpoint=runs["cnn"])
    unet_96 = fingerprint("unet96", "--input_size", "96", checkpoint=runs["cnn"])
    assert unet_96["fingerprint_parts"]["preprocessing"] != unet["fingerprint_parts"]["preprocessing"]
    assert unet_96["fingerprint_parts"]["weights"] == unet["fingerprint_parts"]["weights"]
    assert other_weights["fingerprint"] != first["fingerprint"]

    ok = extract("--checkpoint", runs["vit"], "--data", images, "--out", str(tmp_path / "c1"), "--num_workers", "0",
                 "--check", first["fingerprint"])
    assert ok.returncode == 0, ok.stderr
    refused = extract("--checkpoint", runs["vit_npl"], "--data", images, "--out", str(tmp_path / "c2"),
                      "--check", str(tmp_path / "first.json"))
    assert refused.returncode == 1 and "the encoder's weights differ" in refused.stderr
    assert not (tmp_path / "c2.npy").exists() and not (tmp_path / "c2.partial.npy").exists()
    refused = extract("--checkpoint", runs["vit"], "--data", images, "--out", str(tmp_path / "c3"),
                      "--norm_stats", "imagenet", "--check", str(tmp_path / "first.json"))
    assert refused.returncode == 1 and "the preprocessing differs" in refused.stderr
    refused = extract("--checkpoint", runs["vit"], "--data", images, "--out", str(tmp_path / "c4"),
                      "--input_size", "32")
    assert refused.returncode == 1 and "position table is fixed at 64 pixels" in refused.stderr


def test_a_killed_extraction_resumes_where_it_stopped(runs, images, tmp_path, monkeypatch):
    whole = extract("--checkpoint", runs["vit"], "--data", images, "--out", str(tmp_path / "whole"),
                    "--batch_size", "2", "--num_workers", "0")
    assert whole.returncode == 0, whole.stderr
    real_load, calls = extract_tool.load_gray, []

    def dies_at_the_seventh_image(path):
        calls.append(path)
        if len(calls) == 7:
            raise KeyboardInterrupt  # as a kill: not a user error, nothing is cleaned up
        return real_load(path)

    monkeypatch.setattr(extract_tool, "load_gray", dies_at_the_seventh_image)
    with pytest.raises(KeyboardInterrupt):
        extract("--checkpoint", runs["vit"], "--data", images, "--out", str(tmp_path / "r"), "--batch_size", "2",
                "--num_workers", "0")
    progress = json.loads((tmp_path / "r.progress.json").read_text())
    assert progress["done"] == 6 and not (tmp_path / "r.json").exists()
    calls.clear()
    monkeypatch.setattr(extract_tool, "load_gray", lambda path: calls.append(path) or real_load(path))
    resumed = extract("--checkpoint", runs["vit"], "--data", images, "--out", str(tmp_path / "r"),
                      "--batch_size", "2", "--num_workers", "0")
    assert resumed.returncode == 0, resumed.stderr
    assert len(calls) == 5  # the five images after the sixth, none twice
    assert np.array_equal(np.load(tmp_path / "r.npy"), np.load(tmp_path / "whole.npy"))
    assert not (tmp_path / "r.progress.json").exists()


def test_unet_mean_pooled_and_bad_input(runs, images, tmp_path):
    proc = extract("--checkpoint", runs["cnn"], "--data", images, "--out", str(tmp_path / "u"), "--num_workers", "0")
    assert proc.returncode == 0, proc.stderr
    assert np.load(tmp_path / "u.npy").shape == (11, 1024)  # densenet121's deepest stage
    refused = extract("--checkpoint", runs["cnn"], "--data", images, "--out", str(tmp_path / "u2"), "--pool", "cls")
    assert refused.returncode == 1 and "a U-Net encoder has no class token" in refused.stderr
    listing = tmp_path / "list.txt"
    listing.write_text("a/img0.png\nmissing.png\n")
    os.symlink(os.path.join(images, "a"), tmp_path / "a")
    refused = extract("--checkpoint", runs["vit"], "--data", str(listing), "--out", str(tmp_path / "l"))
    assert refused.returncode == 1 and "1 of 2 listed images are missing" in refused.stderr
    existing = extract("--checkpoint", runs["cnn"], "--data", images, "--out", str(tmp_path / "u"))
    assert existing.returncode == 1 and "already exist" in existing.stderr
