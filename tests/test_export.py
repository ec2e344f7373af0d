"""Reconstruction grids, encoder export to timm/torchvision, and --init_from (issue: see and use what was learned)."""
import argparse
import json
import os
import subprocess
import sys

import pytest
import torch
import torchvision
from PIL import Image
from timm.models.vision_transformer import VisionTransformer

import engine_pretrain
import main_pretrain_multi_datasets_xray as vit_main
import main_pretrain_multi_datasets_xray_cnn as cnn_main
import models_mae
import models_mae_cnn
from tests.helpers import ROOT, child_env, tiny_run_args
from util.model_api import PretrainModel


def _train(script, data_path, out, **overrides):
    args = argparse.ArgumentParser(parents=[script.get_args_parser()]).parse_args(
        tiny_run_args(data_path, out, **overrides))
    assert engine_pretrain.run_pretraining(args, script.build_model, script.check_model_args) == 0
    return os.path.join(out, "checkpoint-0.pth")


@pytest.fixture(scope="module")
def runs(tiny_data, tmp_path_factory):
    root = tmp_path_factory.mktemp("runs")
    return {
        "vit": _train(vit_main, tiny_data[0], str(root / "vit"), input_size=64),
        "vit_npl": _train(vit_main, tiny_data[0], str(root / "vit_npl"), input_size=64, norm_pix_loss=True),
        "cnn": _train(cnn_main, tiny_data[0], str(root / "cnn"), model="densenet121", input_size=64),
        "cnn_npl": _train(cnn_main, tiny_data[0], str(root / "cnn_npl"), model="resnet50", input_size=64,
                          norm_pix_loss=True),
    }


def _tool(name, *args):
    proc = subprocess.run([sys.executable, "-m", f"tools.{name.removesuffix('.py')}", *args], cwd=ROOT, env=child_env(),
                          capture_output=True, text=True, timeout=300)
    return proc


@pytest.mark.parametrize("run", ["vit", "vit_npl", "cnn", "cnn_npl"])
def test_visualize_writes_grid(runs, tiny_data, tmp_path, run):
    proc = _tool("visualize_reconstruction.py", "--checkpoint", runs[run], "--datasets_names", "chestxray_nih",
                 "--data_path", tiny_data[0], "--num", "2", "--out", str(tmp_path))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    pngs = sorted(os.listdir(tmp_path))
    assert pngs == ["chestxray_nih_0.png", "chestxray_nih_1.png"]
    grid = Image.open(tmp_path / pngs[0])
    assert grid.width > 4 * 64 and grid.height > 64
    # the run's own reconstruction grid was written during training as well
    assert os.path.exists(os.path.join(os.path.dirname(runs[run]), "reconstruction-0000.png"))


def test_visualize_is_reproducible_with_fixed_mask_seed(runs, tiny_data, tmp_path):
    for out, seed in (("a", "7"), ("b", "7"), ("c", "8")):
        proc = _tool("visualize_reconstruction.py", "--checkpoint", runs["vit"], "--datasets_names", "chexpert",
                     "--data_path", tiny_data[0], "--num", "1", "--mask_seed", seed, "--out", str(tmp_path / out))
        assert proc.returncode == 0, proc.stdout + proc.stderr
    grids = {out: (tmp_path / out / "chexpert_0.png").read_bytes() for out in "abc"}
    assert grids["a"] == grids["b"] and grids["a"] != grids["c"]  # the seed alone decides the mask


def test_visualize_refuses_encoder_only_file(runs, tmp_path):
    _tool("export_encoder.py", "--checkpoint", runs["vit"], "--out", str(tmp_path / "enc"))
    proc = _tool("visualize_reconstruction.py", "--checkpoint", str(tmp_path / "enc.pth"), "--images", "x.png",
                 "--out", str(tmp_path))
    assert proc.returncode != 0 and "not a pre-training checkpoint" in proc.stderr


@pytest.mark.parametrize("name, timm_name", [("mae_vit_small_patch16_dec512d2b", "vit_small_patch16_224"),
                                             ("mae_vit_small_patch16", "vit_small_patch16_224"),
                                             ("mae_vit_base_patch16_dec512d8b", "vit_base_patch16_224")])
def test_export_target_comes_from_the_registry_entry(name, timm_name):
    """The export target is the registry entry's config, not parsed from the name or guessed from the shape."""
    model = models_mae.create_model(name, img_size=32)
    export = model.export_encoder()
    assert export.meta["timm_model"] == timm_name == models_mae.MODELS.config(name)["timm_model"]
    probe = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(export.target_features(probe), export.reference_features(probe))


def test_both_model_families_implement_the_model_contract():
    for model in (models_mae.create_model("mae_vit_debug_patch16", img_size=32),
                  models_mae_cnn.create_model("resnet18", img_size=64)):
        assert isinstance(model, PretrainModel)
    with pytest.raises(ValueError, match="apply to ViT exports"):
        models_mae_cnn.create_model("resnet18", img_size=64).export_encoder(input_size=96)


def test_export_vit_loads_strictly_into_timm(runs, tmp_path):
    proc = _tool("export_encoder.py", "--checkpoint", runs["vit"], "--out", str(tmp_path / "vit"))
    assert proc.returncode == 0 and "features match" in proc.stdout, proc.stderr
    sidecar = json.loads((tmp_path / "vit.json").read_text())
    assert sidecar["input_size"] == 64 and sidecar["mask_ratio"] == 0.75 and sidecar["norm_pix_loss"] is False
    assert sidecar["sources"] == ["chexpert", "chestxray_nih", "mimic_cxr"] and sidecar["epoch"] == 0
    assert sidecar["normalization"]["per_source"]["chestxray_nih"] == [[0.5056] * 3, [0.252] * 3]
    assert sidecar["timm_model"] is None  # the debug model has no timm name: the sidecar describes it in full
    model = VisionTransformer(**sidecar["timm_kwargs"])
    model.load_state_dict(torch.load(tmp_path / "vit.pth", weights_only=True), strict=True)


def test_export_vit_resamples_pos_embed_and_channels(runs, tmp_path):
    proc = _tool("export_encoder.py", "--checkpoint", runs["vit"], "--out", str(tmp_path / "v"), "--input_size", "96",
                 "--in_chans", "1")
    assert proc.returncode == 0, proc.stderr
    sidecar = json.loads((tmp_path / "v.json").read_text())
    model = VisionTransformer(**sidecar["timm_kwargs"])
    model.load_state_dict(torch.load(tmp_path / "v.pth", weights_only=True), strict=True)
    assert model.forward_features(torch.randn(1, 1, 96, 96)).shape == (1, 37, 64)


def test_export_densenet_loads_strictly_into_torchvision(runs, tmp_path):
    proc = _tool("export_encoder.py", "--checkpoint", runs["cnn"], "--out", str(tmp_path / "d"))
    assert proc.returncode == 0 and "features match" in proc.stdout, proc.stderr
    features = torchvision.models.densenet121().features
    features.load_state_dict(torch.load(tmp_path / "d.pth", weights_only=True), strict=True)


def test_export_resnet50_loads_into_torchvision_without_fc(runs, tmp_path):
    proc = _tool("export_encoder.py", "--checkpoint", runs["cnn_npl"], "--out", str(tmp_path / "r"))
    assert proc.returncode == 0, proc.stderr
    result = torchvision.models.resnet50().load_state_dict(torch.load(tmp_path / "r.pth", weights_only=True),
                                                           strict=False)
    assert sorted(result.missing_keys) == ["fc.bias", "fc.weight"] and not result.unexpected_keys


def test_init_from_reports_loaded_and_missing(runs, tiny_data, tmp_path, caplog):
    export = str(tmp_path / "enc")
    _tool("export_encoder.py", "--checkpoint", runs["vit"], "--out", export)
    _train(vit_main, tiny_data[0], str(tmp_path / "run"), input_size=64, init_from=export + ".pth")
    text = caplog.text
    assert "--init_from" in text and "loaded 30 tensors" in text and "missing 19" in text
    assert "decoder_embed.weight" in text  # the decoder is listed as missing, never silently random


def test_init_from_official_mae_keys_into_one_channel_model():
    source = models_mae.create_model("mae_vit_debug_patch16", img_size=64)
    official = {"model": {f"module.{k}": v for k, v in source.state_dict().items()}}
    target = models_mae.create_model("mae_vit_debug_patch16", img_size=32, in_chans=1)
    report = target.load_pretrained(official)
    torch.testing.assert_close(target.patch_embed.proj.weight,
                               source.patch_embed.proj.weight.sum(dim=1, keepdim=True))
    assert any("channels 3 -> 1" in a for a in report["adapted"])
    assert report["missing"] == [] and any(a.startswith("decoder_pred.weight") for a in report["adapted"])
    rows = source.decoder_pred.weight.reshape(256, 3, -1).mean(dim=1)
    torch.testing.assert_close(target.decoder_pred.weight, rows)


def test_init_from_wrong_architecture_is_an_error():
    big = models_mae.create_model("mae_vit_small_patch16_dec128d2b", img_size=32)
    small = models_mae.create_model("mae_vit_debug_patch16", img_size=32)
    with pytest.raises(ValueError, match="shapes differ"):
        small.load_pretrained(big.state_dict())


def test_init_from_torchvision_densenet_into_one_channel_unet():
    import models_mae_cnn

    model = models_mae_cnn.create_model("densenet121", img_size=64, in_chans=1)
    backbone = torchvision.models.densenet121().features
    report = model.load_pretrained(backbone.state_dict())
    assert report["adapted"] == ["model.encoder.features.conv0.weight (channels 3 -> 1)"] and not report["ignored"]
    assert all(k.startswith(("model.decoder", "model.segmentation_head")) for k in report["missing"])
    torch.testing.assert_close(model.model.encoder.features.conv0.weight, backbone.conv0.weight.sum(1, keepdim=True))
