import sys

import pytest
import segmentation_models_pytorch as smp
import torch

import models_mae_cnn
from tests.helpers import CNN_SCRIPT, run_cli, tiny_run_args
from tests.reference_impl import reference_cnn_forward


@pytest.mark.parametrize("encoder", ["densenet121", "resnet50"])
@pytest.mark.parametrize("in_chans", [3, 1])
def test_cnn_forward_backward(encoder, in_chans):
    model = models_mae_cnn.create_model(encoder, img_size=64, in_chans=in_chans)
    imgs = torch.randn(2, in_chans, 64, 64)
    loss, pred, mask = model(imgs, mask_ratio=0.75)
    loss.backward()
    assert torch.isfinite(loss) and pred.shape == imgs.shape and torch.all(mask.sum(1) == 12)
    assert all(p.grad is not None for p in model.model.encoder.parameters() if p.requires_grad)


@pytest.mark.parametrize("encoder, channels_last", [("densenet121", True), ("densenet121", False), ("resnet50", True)])
def test_cnn_state_dict_is_the_references(encoder, channels_last):
    """The reference wraps smp.Unet as self.model: every key and shape of that network under 'model.', no other."""
    ours = models_mae_cnn.create_model(encoder, img_size=64, channels_last=channels_last).state_dict()
    smp_net = smp.Unet(encoder_name=encoder, encoder_weights=None, in_channels=3, classes=3).state_dict()
    assert {k: tuple(v.shape) for k, v in ours.items()} == {f"model.{k}": tuple(v.shape) for k, v in smp_net.items()}


def _perturbed_loss(model, visible: bool):
    imgs, pred = torch.randn(2, 3, 64, 64), torch.randn(2, 3, 64, 64)
    mask = torch.zeros(2, 16)
    mask[:, :8] = 1
    region = (mask == 0) if visible else (mask == 1)
    bumped = model.patchify(pred)
    bumped[region] += 1.0
    return model.forward_loss(imgs, pred, mask), model.forward_loss(imgs, model.unpatchify(bumped), mask)


def test_cnn_masked_loss_ignores_visible_patches():
    model = models_mae_cnn.create_model("resnet18", img_size=64, loss_region="masked")
    before, after = _perturbed_loss(model, visible=True)
    assert torch.equal(before, after)
    before, after = _perturbed_loss(model, visible=False)
    assert not torch.equal(before, after)


def test_cnn_default_loss_covers_all_pixels():
    model = models_mae_cnn.create_model("resnet18", img_size=64)
    assert model.loss_region == "all"
    before, after = _perturbed_loss(model, visible=True)
    assert not torch.equal(before, after)


def test_cnn_matches_reference_loss():
    model = models_mae_cnn.create_model("densenet121", img_size=64).eval()
    imgs = torch.randn(2, 3, 64, 64)
    torch.manual_seed(5)
    loss, pred, mask = model(imgs, mask_ratio=0.75)
    torch.manual_seed(5)
    ref_loss, ref_pred, ref_mask = reference_cnn_forward(model.model, imgs, 0.75, 16)
    assert torch.equal(mask, ref_mask)
    torch.testing.assert_close(pred, ref_pred, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(loss, ref_loss, rtol=1e-5, atol=1e-6)


def test_cnn_channels_last_default_matches_the_reference_channels_first_model():
    # float64: in float32 the two layouts' rounding differs by ~1% on the deep BN grads of a 2-image batch
    fast = models_mae_cnn.create_model("densenet121", img_size=64).double()
    plain = models_mae_cnn.create_model("densenet121", img_size=64, channels_last=False).double()
    plain.load_state_dict(fast.state_dict())
    first_conv_input = {}
    imgs = torch.randn(2, 3, 64, 64, dtype=torch.float64)
    losses = {}
    for name, model in (("fast", fast), ("plain", plain)):
        model.model.encoder.features.conv0.register_forward_hook(
            lambda module, args, out, name=name: first_conv_input.update({name: args[0]}))
        torch.manual_seed(3)
        losses[name] = model(imgs)[0]
        losses[name].backward()
    assert first_conv_input["fast"].is_contiguous(memory_format=torch.channels_last)
    assert not first_conv_input["fast"].is_contiguous() and first_conv_input["plain"].is_contiguous()
    assert fast.model.encoder.features.conv0.weight.is_contiguous(memory_format=torch.channels_last)
    assert {type(b) for b in fast.model.decoder.blocks} == {type(b) for b in plain.model.decoder.blocks}  # SMP's own
    torch.testing.assert_close(losses["fast"], losses["plain"], rtol=1e-12, atol=0)
    for (key, a), b in zip(fast.named_parameters(), plain.parameters()):
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-8, atol=1e-12, msg=key)


def test_cnn_masked_input_is_zero_in_removed_patches():
    model = models_mae_cnn.create_model("resnet18", img_size=64)
    x = torch.randn(1, 16, 768)
    torch.manual_seed(1)
    masked, mask = model.random_masking(x, 0.75)
    assert torch.all(masked[mask == 1] == 0) and torch.equal(masked[mask == 0], x[mask == 0])


def test_cnn_norm_pix_loss_changes_target():
    a = models_mae_cnn.create_model("resnet18", img_size=64)
    b = models_mae_cnn.create_model("resnet18", img_size=64, norm_pix_loss=True)
    b.load_state_dict(a.state_dict())
    imgs = torch.rand(1, 3, 64, 64) * 5 + 3
    torch.manual_seed(0)
    la = a(imgs)[0]
    torch.manual_seed(0)
    lb = b(imgs)[0]
    assert not torch.isclose(la, lb)


def test_cnn_other_architecture():
    model = models_mae_cnn.create_model("resnet18", img_size=64, model_arch="FPN")
    assert type(model.model).__name__ == "FPN"
    model(torch.randn(1, 3, 64, 64))[0].backward()


@pytest.mark.parametrize("kwargs, message", [
    ({"img_size": 250}, "--input_size 250 is not divisible by 32"),
    ({"encoder_name": "densnet121"}, "Did you mean: densenet121"),
    ({"model_arch": "Unet3"}, "--model_arch must be one of"),
    ({"loss_region": "visible"}, "--cnn_loss must be one of"),
])
def test_cnn_bad_config_is_clear(kwargs, message):
    kwargs = {"encoder_name": "resnet18", "img_size": 64, **kwargs}
    with pytest.raises(ValueError, match=message):
        models_mae_cnn.MaskedAutoencoderCNN(**kwargs)


@pytest.mark.slow
def test_cnn_cli_bad_input_size_fails_before_compute(tiny_data, tmp_path):
    proc = run_cli([sys.executable, CNN_SCRIPT, *tiny_run_args(tiny_data[0], str(tmp_path), model="densenet121",
                                                               input_size=48)], expect_rc=None)
    assert proc.returncode != 0 and "--input_size 48 is not divisible by 32" in proc.stderr, proc.output
    assert not (tmp_path / "log.txt").exists()


@pytest.mark.slow
def test_cnn_cli_torchrun_two_processes_and_resume(tiny_data, tmp_path, free_port):
    out = str(tmp_path)
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={free_port}"]
    args = tiny_run_args(tiny_data[0], out, model="densenet121", cnn_loss="masked")
    run_cli([*torchrun, CNN_SCRIPT, *args])
    first = torch.load(tmp_path / "checkpoint-last.pth", weights_only=True)
    assert first["epoch"] == 0 and first["args"]["cnn_loss"] == "masked" and first["world_size"] == 2
    proc = run_cli([*torchrun, CNN_SCRIPT, *tiny_run_args(tiny_data[0], out, model="densenet121", cnn_loss="masked",
                                                          epochs=2)])
    assert "start at epoch 1 step 0" in proc.stdout
    assert torch.load(tmp_path / "checkpoint-last.pth", weights_only=True)["epoch"] == 1


def test_deterministic_with_an_architecture_without_a_deterministic_cuda_backward_is_refused():
    import argparse

    import main_pretrain_multi_datasets_xray_cnn as cnn_main

    def problems(*argv):
        args = argparse.ArgumentParser(parents=[cnn_main.get_args_parser()]).parse_args(["--input_size", "64", *argv])
        return cnn_main.check_model_args(args)

    assert "--deterministic with --model_arch FPN" in problems("--model_arch", "FPN", "--deterministic")[0]
    assert problems("--model_arch", "FPN", "--deterministic", "--device", "cpu") == []  # CPU kernels are fine
    assert problems("--model_arch", "Unet", "--deterministic") == []
    assert problems("--model_arch", "PSPNet") == []


def test_a_mask_ratio_that_removes_no_patch_is_refused_only_for_the_masked_loss():
    """--cnn_loss masked averages over the removed patches (0/0 without one); the reference's 'all' is defined."""
    import argparse

    import main_pretrain_multi_datasets_xray_cnn as cnn_main

    def problems(*argv):
        args = argparse.ArgumentParser(parents=[cnn_main.get_args_parser()]).parse_args(["--input_size", "64", *argv])
        return cnn_main.check_model_args(args)

    assert problems("--mask_ratio", "0", "--cnn_loss", "masked") == [
        "--mask_ratio 0.0 removes none of the 16 patches, and the loss is the mean over the removed ones (NaN at every "
        "step); pass a larger --mask_ratio (the reference's 0.75, the paper's 0.9)"]
    assert problems("--mask_ratio", "0", "--cnn_loss", "all") == []
    assert problems("--mask_ratio", "0.1", "--cnn_loss", "masked") == []  # int(16 * 0.9) = 14 kept: 2 removed
