"""tools/export_encoder and the models' export_encoder: timm and torchvision."""
import json

import pytest
import timm
import torch
import torchvision
from timm.models.vision_transformer import VisionTransformer

import models_mae
import models_mae_cnn
from tests.helpers import run_tool_in_process
from util.model_api import PretrainModel


@pytest.mark.parametrize("name, timm_name", [("mae_vit_small_patch16_dec512d2b", "vit_small_patch16_224"),
                                             ("mae_vit_small_patch16", "vit_small_patch16_224"),
                                             ("mae_vit_base_patch16_dec512d8b", "vit_base_patch16_224")])
def test_export_target_is_the_named_timm_model(name, timm_name):
    """The export names the timm model the test expects (not parsed from the name or guessed from the shape), and its
    weights load strictly into that model, built here by timm from the expected name alone with the sidecar's size
    keywords, giving this encoder's features."""
    model = models_mae.create_model(name, img_size=32).eval()
    export = model.export_encoder()
    assert export.meta["timm_model"] == timm_name
    assert set(export.meta["timm_kwargs"]) == {"img_size", "in_chans", "num_classes"}  # sizes only, no architecture
    target = timm.create_model(timm_name, pretrained=False, **export.meta["timm_kwargs"]).eval()
    target.load_state_dict(export.state_dict, strict=True)
    probe = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(target.forward_features(probe), model.forward_features(probe))


def test_both_model_families_implement_the_model_contract():
    for model in (models_mae.create_model("mae_vit_debug_patch16", img_size=32),
                  models_mae_cnn.create_model("resnet18", img_size=64)):
        assert isinstance(model, PretrainModel)
    with pytest.raises(ValueError, match="apply to ViT exports"):
        models_mae_cnn.create_model("resnet18", img_size=64).export_encoder(input_size=96)


def test_export_vit_loads_strictly_into_timm(runs, tmp_path):
    proc = run_tool_in_process("export_encoder.py", "--checkpoint", runs["vit"], "--out", str(tmp_path / "vit"))
    assert proc.returncode == 0 and "features match" in proc.stdout, proc.stderr
    sidecar = json.loads((tmp_path / "vit.json").read_text())
    assert sidecar["input_size"] == 64 and sidecar["mask_ratio"] == 0.75 and sidecar["norm_pix_loss"] is False
    assert sidecar["sources"] == ["chexpert", "chestxray_nih", "mimic_cxr"] and sidecar["epoch"] == 0
    assert sidecar["normalization"]["per_source"]["chestxray_nih"] == [[0.5056] * 3, [0.252] * 3]
    assert sidecar["timm_model"] is None  # the debug model has no timm name: the sidecar describes it in full
    model = VisionTransformer(**sidecar["timm_kwargs"])
    model.load_state_dict(torch.load(tmp_path / "vit.pth", weights_only=True), strict=True)


def test_export_vit_resamples_pos_embed_and_channels(runs, tmp_path):
    proc = run_tool_in_process("export_encoder.py", "--checkpoint", runs["vit"], "--out", str(tmp_path / "v"),
                               "--input_size", "96", "--in_chans", "1")
    assert proc.returncode == 0, proc.stderr
    sidecar = json.loads((tmp_path / "v.json").read_text())
    model = VisionTransformer(**sidecar["timm_kwargs"])
    model.load_state_dict(torch.load(tmp_path / "v.pth", weights_only=True), strict=True)
    assert model.forward_features(torch.randn(1, 1, 96, 96)).shape == (1, 37, 64)


def test_export_densenet_loads_strictly_into_torchvision(runs, tmp_path):
    proc = run_tool_in_process("export_encoder.py", "--checkpoint", runs["cnn"], "--out", str(tmp_path / "d"))
    assert proc.returncode == 0 and "features match" in proc.stdout, proc.stderr
    features = torchvision.models.densenet121().features
    features.load_state_dict(torch.load(tmp_path / "d.pth", weights_only=True), strict=True)


def test_export_resnet50_loads_into_torchvision_without_fc(runs, tmp_path):
    proc = run_tool_in_process("export_encoder.py", "--checkpoint", runs["cnn_npl"], "--out", str(tmp_path / "r"))
    assert proc.returncode == 0, proc.stderr
    result = torchvision.models.resnet50().load_state_dict(torch.load(tmp_path / "r.pth", weights_only=True),
                                                           strict=False)
    assert sorted(result.missing_keys) == ["fc.bias", "fc.weight"] and not result.unexpected_keys


@pytest.mark.parametrize("encoder", ["resnet18", "densenet121", "resnext50_32x4d"])
def test_cnn_export_target_comes_from_the_export_table(encoder):
    export = models_mae_cnn.create_model(encoder, img_size=64).eval().export_encoder()
    assert export.meta["torchvision_target"].startswith(f"torchvision.models.{encoder}()")
    probe = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(export.target_features(probe), export.reference_features(probe))
    with pytest.raises(ValueError, match="no torchvision equivalent for encoder 'efficientnet-b0'"):
        models_mae_cnn.to_torchvision_state_dict({}, "efficientnet-b0")


def test_every_export_has_a_safetensors_copy_of_its_weights(runs, tmp_path):
    from safetensors.torch import load_file

    for kind in ("vit", "cnn"):
        proc = run_tool_in_process("export_encoder.py", "--checkpoint", runs[kind], "--out", str(tmp_path / kind))
        assert proc.returncode == 0, proc.stderr
        pth = torch.load(tmp_path / f"{kind}.pth", weights_only=True)
        safe = load_file(tmp_path / f"{kind}.safetensors")
        assert pth.keys() == safe.keys() and all(torch.equal(pth[k], safe[k]) for k in pth)


@pytest.mark.parametrize("in_chans", [None, 1])
def test_hf_export_loads_into_transformers_vitmodel_with_our_features(runs, tmp_path, in_chans):
    """--format hf: transformers.ViTModel.from_pretrained(folder), offline, gives our encoder's patch features
    (last_hidden_state = forward_features) and its class token as pooler_output, to 1e-5, on a probe batch."""
    import transformers  # a test dependency (requirements-test.txt)
    out = tmp_path / "vit_hf"
    extra = ["--in_chans", str(in_chans)] if in_chans else []
    proc = run_tool_in_process("export_encoder.py", "--checkpoint", runs["vit"], "--out", str(out), "--format", "hf",
                               *extra)
    assert proc.returncode == 0, proc.stderr
    assert {p.name for p in out.iterdir()} == {"config.json", "model.safetensors", "medmae_export.json"}
    hf = transformers.ViTModel.from_pretrained(str(out), local_files_only=True).eval()
    sidecar = json.loads((out / "medmae_export.json").read_text())
    ours = VisionTransformer(**sidecar["timm_kwargs"]).eval()
    ours.load_state_dict(models_mae.to_timm_state_dict(torch.load(runs["vit"], weights_only=True)["model"],
                                                       in_chans=in_chans), strict=True)
    probe = torch.randn(3, sidecar["in_chans"], sidecar["input_size"], sidecar["input_size"])
    with torch.no_grad():
        features = ours.forward_features(probe)
        result = hf(pixel_values=probe)
    torch.testing.assert_close(result.last_hidden_state, features, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(result.pooler_output, features[:, 0], rtol=1e-5, atol=1e-5)


def test_hf_export_refuses_a_cnn(runs, tmp_path):
    proc = run_tool_in_process("export_encoder.py", "--checkpoint", runs["cnn"], "--out", str(tmp_path / "x"),
                               "--format", "hf")
    assert proc.returncode == 1 and "--format hf writes a transformers ViTModel" in proc.stderr + proc.stdout
    assert not (tmp_path / "x").exists()
