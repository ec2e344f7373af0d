"""util/precision.py: the --precision auto rule, autocast, and the fp16 loss scaler on CPU."""
import os

import pytest
import torch

import models_mae
from util.optim import build_optimizer
from util.precision import LossScaler, autocast, configure_backends, has_native_bf16, resolve_precision


@pytest.mark.parametrize("capability, native", [((7, 0), False), ((7, 5), False), ((8, 0), True), ((8, 6), True),
                                                ((9, 0), True)])
def test_auto_picks_bf16_only_with_native_units(capability, native):
    """V100 (7.0) and T4 (7.5) emulate bf16, which torch.cuda.is_bf16_supported() accepts; auto must pick fp16."""
    assert has_native_bf16(capability) is native


def test_auto_is_fp32_on_cpu():
    assert resolve_precision("auto", torch.device("cpu")) == "fp32"


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_tiny_model_trains_a_step_under_autocast(precision):
    torch.manual_seed(0)
    model = models_mae.create_model("mae_vit_debug_patch16", img_size=32)
    optimizer = build_optimizer(model, 0.05, 1e-3, torch.device("cpu"))
    scaler = LossScaler(precision, torch.device("cpu"))
    assert scaler.enabled == (precision == "fp16")
    before = model.blocks[0].attn.qkv.weight.detach().clone()
    with autocast(precision, torch.device("cpu")):
        loss, pred, _ = model(torch.randn(2, 3, 32, 32), mask_ratio=0.75)
    assert pred.dtype == {"bf16": torch.bfloat16, "fp16": torch.float16}[precision] and loss.dtype == torch.float32
    scaler.backward(loss)
    norm = scaler.step_prepare(optimizer, model.parameters(), None)
    assert torch.isfinite(norm)
    scaler.step_apply(optimizer)
    assert not torch.equal(model.blocks[0].attn.qkv.weight, before)


def test_cuda_backends_autotune_and_keep_fp32_exact():
    saved = (torch.backends.cudnn.benchmark, torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)
    try:
        torch.backends.cudnn.benchmark, torch.backends.cudnn.allow_tf32 = False, True
        configure_backends(torch.device("cpu"))
        assert torch.backends.cudnn.benchmark is False  # CPU runs are left alone
        configure_backends(torch.device("cuda"))  # only sets flags: runs without a GPU
        assert torch.backends.cudnn.benchmark is True
        assert not torch.backends.cuda.matmul.allow_tf32 and not torch.backends.cudnn.allow_tf32
    finally:
        torch.backends.cudnn.benchmark, torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


def test_deterministic_mode_sets_every_switch():
    cuda_flags = ("benchmark", "deterministic")
    saved = ([getattr(torch.backends.cudnn, f) for f in cuda_flags], torch.backends.cuda.flash_sdp_enabled(),
             torch.backends.cuda.mem_efficient_sdp_enabled(), torch.backends.cuda.cudnn_sdp_enabled(),
             torch.are_deterministic_algorithms_enabled())
    try:
        configure_backends(torch.device("cuda"), deterministic=True)  # only sets flags: runs without a GPU
        assert torch.are_deterministic_algorithms_enabled() and os.environ["CUBLAS_WORKSPACE_CONFIG"]
        assert torch.backends.cudnn.deterministic and not torch.backends.cudnn.benchmark
        assert not (torch.backends.cuda.flash_sdp_enabled() or torch.backends.cuda.mem_efficient_sdp_enabled()
                    or torch.backends.cuda.cudnn_sdp_enabled())
    finally:
        for flag, value in zip(cuda_flags, saved[0], strict=True):
            setattr(torch.backends.cudnn, flag, value)
        torch.backends.cuda.enable_flash_sdp(saved[1])
        torch.backends.cuda.enable_mem_efficient_sdp(saved[2])
        torch.backends.cuda.enable_cudnn_sdp(saved[3])
        torch.use_deterministic_algorithms(saved[4])
