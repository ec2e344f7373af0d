"""--init_from: the models' load_pretrained, in a run and on foreign checkpoints."""
import pytest
import torch
import torchvision

import main_pretrain_multi_datasets_xray as vit_main
import models_mae
import models_mae_cnn
from tests.helpers import run_tool_in_process, train_in_process


def test_init_from_reports_loaded_and_missing(runs, tiny_data, tmp_path, caplog):
    export = str(tmp_path / "enc")
    run_tool_in_process("export_encoder.py", "--checkpoint", runs["vit"], "--out", export)
    train_in_process(vit_main, tiny_data[0], str(tmp_path / "run"), input_size=64, init_from=export + ".pth")
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

    model = models_mae_cnn.create_model("densenet121", img_size=64, in_chans=1)
    backbone = torchvision.models.densenet121().features
    report = model.load_pretrained(backbone.state_dict())
    assert report["adapted"] == ["model.encoder.features.conv0.weight (channels 3 -> 1)"] and not report["ignored"]
    assert all(k.startswith(("model.decoder", "model.segmentation_head")) for k in report["missing"])
    torch.testing.assert_close(model.model.encoder.features.conv0.weight, backbone.conv0.weight.sum(1, keepdim=True))
