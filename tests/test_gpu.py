"""The CUDA paths, run by `make gpu-check` (pytest -m gpu) on the device it names.

On a GPU machine the device is CUDA. make gpu-check's smoke mode sets GPU_CHECK_DEVICE=cpu on a machine without one,
so CI runs every check on CPU and keeps it from rotting; a plain `pytest` deselects them (pyproject.toml).
"""
import json
import math
import os
import re
import signal
import sys

import pytest
import torch
from PIL import Image

import engine
import main_pretrain_multi_datasets_xray as vit_main
import main_pretrain_multi_datasets_xray_cnn as cnn_main
import models_mae_cnn
from data.gpu_augment import BatchAugment, CanvasTransform
from data.synthetic import chest_image, make_nih_labelled
from engine_pretrain import PretrainTask, batch_bytes
from tests.helpers import (
    ROOT,
    VIT_SCRIPT,
    build_dataset,
    check_fp16_overflow_is_a_scaler_skip,
    child_env,
    in_process_args,
    last_checkpoint,
    run_cli,
    spawn,
    tiny_run_args,
    wait_for_line,
)
from util import checkpoint as ckpt_lib
from util import dist as dist_lib
from util.args import ExitCode

pytestmark = [pytest.mark.gpu, pytest.mark.slow]


@pytest.fixture(scope="module")
def device() -> torch.device:
    name = os.environ.get("GPU_CHECK_DEVICE") or ("cuda" if torch.cuda.is_available() else "")
    if not name:
        pytest.skip("needs CUDA; on a machine without it, make gpu-check runs these on CPU (GPU_CHECK_DEVICE=cpu)")
    if name.startswith("cuda") and not torch.cuda.is_available():
        pytest.fail(f"GPU_CHECK_DEVICE={name} but torch.cuda.is_available() is False (torch {torch.__version__})")
    return torch.device(name)


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
@pytest.mark.parametrize("kind", ["vit", "unet"])
def test_mixed_precision_steps_train(tiny_data, tmp_path, device, kind, precision):
    # the paper's DenseNet-121 U-Net on CUDA; on CPU (smoke mode) fp16 convolutions are slow, so a ResNet-18 U-Net
    encoder = "densenet121" if device.type == "cuda" else "resnet18"
    script, model = (vit_main, "mae_vit_debug_patch16") if kind == "vit" else (cnn_main, encoder)
    args = in_process_args(script, tiny_data[0], str(tmp_path), model=model, device=str(device), precision=precision,
                           input_size=32 if kind == "vit" or device.type == "cpu" else 64, max_steps_per_epoch=3)
    assert engine.run(PretrainTask(script.build_model, script.check_model_args), args) == ExitCode.OK
    line = json.loads((tmp_path / "log.txt").read_text().splitlines()[-1])
    assert math.isfinite(line["train_loss"]) and math.isfinite(line["train_grad_norm"]), line
    ckpt = last_checkpoint(str(tmp_path))
    assert ckpt["optimizer_steps"] + ckpt["scaler_skips_total"] == 3 and ckpt["optimizer_steps"] >= 1
    assert ("loss_scale" in json.dumps(line)) == (precision == "fp16")
    if device.type == "cuda":
        assert line["train_max_memory_mb"] > 0


def test_fp16_overflow_is_a_scaler_skip_on_the_device(tiny_data, tmp_path, device):
    check_fp16_overflow_is_a_scaler_skip(tiny_data[0], tmp_path, str(device))


def test_gpu_augment_on_the_device_agrees_with_cpu(device):
    canvases, hws = [], []
    for i, (h, w) in enumerate([(60, 50), (64, 64), (40, 63), (33, 47)]):
        canvas, hw, _ = CanvasTransform(64, 0)(Image.fromarray(chest_image(h, w, seed=i)))
        canvases.append(canvas)
        hws.append(hw)
    canvas, hw, source = torch.stack(canvases), torch.stack(hws), torch.zeros(4, dtype=torch.long)
    augment = BatchAugment(32, (0.3, 1.0), [([0.5], [0.25])], in_chans=3)
    on_cpu = augment(canvas, hw, source, seed=11)
    on_device = augment(canvas.to(device), hw, source, seed=11)
    assert on_device.device.type == device.type and on_device.shape == on_cpu.shape and on_cpu.shape[-2:] == (32, 32)
    torch.testing.assert_close(on_device.cpu(), on_cpu, rtol=0, atol=2e-3)  # bicubic kernels differ in rounding


def test_rng_state_round_trip_on_the_device(device):
    state = ckpt_lib.rng_state(device)
    first = torch.rand(8, device=device), torch.randint(0, 1000, (8,))
    ckpt_lib.set_rng_state(state, device, local_rank=device.index or 0)
    again = torch.rand(8, device=device), torch.randint(0, 1000, (8,))
    assert all(torch.equal(a, b) for a, b in zip(first, again, strict=True))
    assert ("cuda" in state) == (device.type == "cuda")


def test_unet_stays_channels_last_through_a_step(device):
    model = models_mae_cnn.create_model("densenet121", img_size=64, mask_ratio=0.75).to(device)
    convs = [m for m in model.modules() if isinstance(m, torch.nn.Conv2d)]
    seen = []  # the activations themselves, not only the weights (which .to(memory_format) sets anyway)
    hooks = [c.register_forward_hook(lambda m, i, o: seen.append((i[0], o))) for c in convs[:3] + convs[-3:]]
    loss, _, _ = model(torch.randn(2, 3, 64, 64, device=device))
    for hook in hooks:
        hook.remove()
    assert len(seen) == 6 and all(t.is_contiguous(memory_format=torch.channels_last) for pair in seen for t in pair)
    loss.backward()
    convs = [m for m in model.modules() if isinstance(m, torch.nn.Conv2d)]
    assert convs and all(m.weight.is_contiguous(memory_format=torch.channels_last) for m in convs)
    assert all(m.weight.grad.is_contiguous(memory_format=torch.channels_last) for m in convs)


def test_loader_batches_are_pinned_for_cuda(tiny_data, tmp_path, device):
    args = in_process_args(vit_main, tiny_data[0], str(tmp_path), device=str(device), num_workers=1, pin_mem=True)
    dataset, _ = build_dataset(["chexpert", "chestxray_nih", "mimic_cxr"], tiny_data[0])
    data = engine.TaskData(train=dataset, name="the data", batch_bytes=batch_bytes(args))
    loader, _, _ = engine.train_loader(args, data, dist_lib.DistInfo(), device)
    images, _ = next(iter(loader))
    assert images.is_pinned() == (device.type == "cuda")


def test_process_group_at_world_size_1_uses_the_device_backend(tiny_data, tmp_path, device, free_port):
    proc = run_cli([sys.executable, VIT_SCRIPT, *tiny_run_args(tiny_data[0], str(tmp_path), device=str(device),
                                                               force_process_group=True)],
                   env=child_env(MASTER_PORT=free_port))
    backend = "nccl" if device.type == "cuda" else "gloo"
    assert re.search(rf"rank 0/1 \(local 0\) on \S+ via single, backend {backend}", proc.stdout), proc.output
    assert os.path.exists(tmp_path / "checkpoint-0.pth")


def test_sigterm_then_resume_on_the_device(tiny_data, tmp_path, device):
    def command(epochs: int) -> list[str]:
        return [sys.executable, VIT_SCRIPT, *tiny_run_args(tiny_data[0], str(tmp_path), device=str(device),
                                                           input_size=64, batch_size=2, epochs=epochs)]

    proc = spawn(command(200))
    wait_for_line(proc, r"Epoch: \[0\]\s+\[\s*2/")
    proc.send_signal(signal.SIGTERM)
    rest, _ = proc.communicate(timeout=120)
    assert proc.returncode == ExitCode.PREEMPTED and "received SIGTERM" in rest, rest
    epoch, step = ckpt_lib.progress_of(last_checkpoint(str(tmp_path)))
    resumed = run_cli(command(epoch + 1))  # finish the interrupted epoch
    assert f"resumed from {tmp_path}/checkpoint-last.pth: epoch {epoch}, step {step}" in resumed.stdout, resumed.output


def test_kill9_then_resume_in_deterministic_mode_gives_identical_weights(tiny_data, tmp_path, device):
    # with a loader worker: the augmentation then runs outside the training process, and the CUDA generator the
    # training draws from must come back from the checkpoint on its own (no per-sample seeding touches it)
    flags = {"device": str(device), "deterministic": True, "input_size": 64, "batch_size": 2, "epochs": 3,
             "warmup_epochs": 1, "save_every_steps": 1, "num_workers": 1}
    straight, interrupted = str(tmp_path / "straight"), str(tmp_path / "interrupted")
    run_cli([sys.executable, VIT_SCRIPT, *tiny_run_args(tiny_data[0], straight, **flags)])
    cmd = [sys.executable, VIT_SCRIPT, *tiny_run_args(tiny_data[0], interrupted, **flags)]
    proc = spawn(cmd)
    wait_for_line(proc, r"Epoch: \[1\]\s+\[\s*3/")
    proc.send_signal(signal.SIGKILL)
    assert proc.wait(timeout=30) == -signal.SIGKILL
    resumed = run_cli(cmd)
    assert re.search(r"resumed from .*checkpoint-last.pth: epoch 1, step [3-9]", resumed.stdout), resumed.output
    a, b = last_checkpoint(straight), last_checkpoint(interrupted)
    assert a["epoch"] == b["epoch"] == flags["epochs"] - 1
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"]), "weights differ after the resume"


def test_finetune_in_bf16_with_a_process_group_gathers_and_scores_on_the_device(tmp_path, device, free_port):
    """Fine-tuning's device paths: bf16 autocast in training and scoring, and the prediction gather over the
    device's backend (NCCL on CUDA, through --force_process_group at world size 1)."""
    lists = make_nih_labelled(str(tmp_path / "nih"), patients=(4, 2, 2), size=(32, 32))
    out = tmp_path / "out"
    flags = ["--model", "vit_debug_patch16", "--data_path", str(tmp_path / "nih"), "--train_list", lists["train"],
             "--val_list", lists["val"], "--test_list", lists["test"], "--input_size", "32", "--batch_size", "4",
             "--epochs", "2", "--warmup_epochs", "0", "--num_workers", "1", "--device", str(device), "--precision",
             "bf16", "--force_process_group", "--bootstrap", "10", "--output_dir", str(out), "--log_dir", str(out)]
    proc = run_cli([sys.executable, str(ROOT / "main_finetune_chestxray.py"), *flags],
                   env=child_env(MASTER_PORT=free_port))
    backend = "nccl" if device.type == "cuda" else "gloo"
    assert f"backend {backend}" in proc.stdout and "precision bf16" in proc.stdout, proc.output
    results = json.loads((out / "results.json").read_text())
    assert results["test"]["images"] == 4 and results["test"]["mean_auroc"] is not None, proc.output


@pytest.mark.parametrize("model", ["unet_resnet18", "dpt_vit_debug_patch16"])
def test_segmentation_in_bf16_with_a_process_group_trains_and_scores_on_the_device(tmp_path, device, free_port,
                                                                                    model):
    """Segmentation's device paths: bf16 autocast in training, the Dice loss and scoring, the per-image metrics
    gathered over the device's backend (NCCL on CUDA, --force_process_group at world size 1), the overlays."""
    from data.synthetic import make_lung_masks

    data = make_lung_masks(str(tmp_path / "lungs"), images=20, size=(64, 64))
    out = tmp_path / "out"
    flags = ["--model", model, "--dataset", "folder", "--data_path", data, "--mask_suffix", "_mask",
             "--input_size", "64", "--batch_size", "4", "--epochs", "2", "--warmup_epochs", "0", "--num_workers", "1",
             "--device", str(device), "--precision", "bf16", "--force_process_group", "--bootstrap", "10",
             "--output_dir", str(out), "--log_dir", str(out)]
    proc = run_cli([sys.executable, str(ROOT / "main_segment_chestxray.py"), *flags],
                   env=child_env(MASTER_PORT=free_port))
    backend = "nccl" if device.type == "cuda" else "gloo"
    assert f"backend {backend}" in proc.stdout and "precision bf16" in proc.stdout, proc.output
    results = json.loads((out / "results.json").read_text())
    assert results["test"]["images"] == 4 and math.isfinite(results["test"]["mean_dice"]), proc.output
    assert (out / "overlays_worst.png").is_file()


def test_feature_extraction_on_the_device_matches_cpu(tiny_data, tmp_path, device):
    """tools.extract_features on the device gives the CPU's features (fp32, to 1e-4) and the same fingerprint."""
    assert vit_main.main(tiny_run_args(tiny_data[0], str(tmp_path / "run"), input_size=32)) == 0
    checkpoint = str(tmp_path / "run" / "checkpoint-0.pth")
    images = tmp_path / "images"
    images.mkdir()
    for k in range(5):
        Image.fromarray(chest_image(40, 40, seed=k)).save(images / f"{k}.png")
    for out, where in (("cpu", "cpu"), ("device", str(device))):
        run_cli([sys.executable, "-m", "tools.extract_features", "--checkpoint", checkpoint, "--data", str(images),
                 "--out", str(tmp_path / out), "--device", where, "--num_workers", "0", "--pool", "both"])
    cpu, dev = (json.loads((tmp_path / f"{out}.json").read_text()) for out in ("cpu", "device"))
    assert cpu["fingerprint"] == dev["fingerprint"] and dev["versions"]["device"] == str(device)
    import numpy as np
    np.testing.assert_allclose(np.load(tmp_path / "device.npy"), np.load(tmp_path / "cpu.npy"), atol=1e-4)


def test_ddp_and_compile_together_with_the_device_backend_and_heartbeat(tiny_data, tmp_path, device, free_port):
    """torch.compile inside DDP on the device backend (NCCL on CUDA) at world size 1, with the heartbeat's store
    beside it: the combination the 8-GPU runs use, which no CPU test exercises on NCCL."""
    proc = run_cli([sys.executable, VIT_SCRIPT, *tiny_run_args(tiny_data[0], str(tmp_path), device=str(device),
                                                               force_process_group=True, compile=True,
                                                               max_steps_per_epoch=3)],
                   env=child_env(MASTER_PORT=free_port), timeout=900)
    backend = "nccl" if device.type == "cuda" else "gloo"
    assert f"backend {backend}" in proc.stdout, proc.output
    line = json.loads((tmp_path / "log.txt").read_text().splitlines()[-1])
    assert math.isfinite(line["train_loss"]) and os.path.exists(tmp_path / "checkpoint-0.pth"), proc.output
    assert "heartbeat" not in proc.stderr.lower(), proc.output  # no liveness verdict: the beat ran and stayed quiet


# bf16's 8-bit mantissa: a softmax-attention output and its gradients agree with fp32 to about 1e-2 relative
SDPA_TOLERANCE = {torch.bfloat16: dict(rtol=2e-2, atol=2e-2), torch.float32: dict(rtol=1e-4, atol=1e-5)}


@pytest.mark.parametrize("tokens", [20, 197])  # ViT-S at mask 0.9 (19 visible + cls), and all 196 + cls
def test_attention_kernels_agree_forward_and_backward(device, tokens):
    """Flash, memory-efficient and math scaled-dot-product attention (what timm's fused attention picks among),
    forward and backward, in bf16 and fp32, against an fp64 computation from the formula."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    torch.manual_seed(0)
    q, k, v = (torch.randn(4, 6, tokens, 64, dtype=torch.float64) for _ in range(3))
    grad_out = torch.randn(4, 6, tokens, 64, dtype=torch.float64)
    qd, kd, vd = (t.clone().requires_grad_() for t in (q, k, v))
    reference = torch.softmax(qd @ kd.transpose(-2, -1) / 8.0, dim=-1) @ vd
    reference.backward(grad_out)
    backends = ([SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]
                if device.type == "cuda" else [SDPBackend.MATH])
    for dtype in (torch.bfloat16, torch.float32):
        for backend in backends:
            if backend == SDPBackend.FLASH_ATTENTION and dtype == torch.float32:
                continue  # flash attention has no fp32 kernel
            qx, kx, vx = (t.to(device, dtype).requires_grad_() for t in (q, k, v))
            with sdpa_kernel(backend):
                out = torch.nn.functional.scaled_dot_product_attention(qx, kx, vx)
            out.backward(grad_out.to(device, dtype))
            tolerance = SDPA_TOLERANCE[dtype]
            torch.testing.assert_close(out.double().cpu(), reference.detach(), **tolerance, msg=f"{backend} {dtype}")
            for ours, theirs in ((qx, qd), (kx, kd), (vx, vd)):
                torch.testing.assert_close(ours.grad.double().cpu(), theirs.grad, **tolerance,
                                           msg=f"{backend} {dtype} backward")


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_first_step_loss_and_gradient_norm_in_half_precision_match_fp32(device, precision):
    """The same MAE, batch and mask: the first loss and gradient norm under autocast equal fp32's within the
    half type's rounding (written down here: 2% for the loss, 5% for the gradient norm)."""
    import models_mae
    from util.precision import autocast

    results = {}
    for name in ("fp32", precision):
        torch.manual_seed(0)
        model = models_mae.create_model("mae_vit_debug_patch16", img_size=64).to(device)
        images = torch.randn(4, 3, 64, 64, generator=torch.Generator().manual_seed(1)).to(device)
        torch.manual_seed(2)  # the same mask noise
        with autocast(name, device):
            loss, _, _ = model(images, mask_ratio=0.75)
        loss.float().backward()
        norm = torch.linalg.vector_norm(torch.stack([p.grad.float().norm() for p in model.parameters()
                                                     if p.grad is not None]))
        results[name] = (loss.item(), norm.item())
    (loss32, norm32), (loss16, norm16) = results["fp32"], results[precision]
    assert loss16 == pytest.approx(loss32, rel=0.02) and norm16 == pytest.approx(norm32, rel=0.05), results


def test_a_training_step_syncs_with_the_host_at_most_once(tiny_data, tmp_path, device):
    """From the first batch on the device to the end of the epoch's steps, at most one host sync per optimizer step
    (optimizer_step's read of the loss, gradient norm and stop flag) and none in the forward or backward. On CUDA,
    CUDA's sync debug mode flags every operation that makes the host wait for the device; on CPU (smoke mode) every
    read of a tensor into Python is counted instead (the mechanism; tests/util/test_prefetch.py)."""
    import warnings

    from tests.util.test_prefetch import CountingTask, counting_host_reads

    counts, active, steps = {}, [False], [0]
    task = CountingTask(vit_main.build_model, vit_main.check_model_args, active=active, steps=steps)
    args = in_process_args(vit_main, tiny_data[0], str(tmp_path), device=str(device), num_workers=1, pin_mem=True,
                           max_steps_per_epoch=6, epochs=1)
    if device.type != "cuda":
        with counting_host_reads(counts, active):
            assert engine.run(task, args) == ExitCode.OK
        assert steps[0] == 6 and sum(counts.values()) <= steps[0], counts
        return
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        original = task.to_device

        def to_device_then_watch(run, state, batch, step):  # from the first batch on the device
            moved = original(run, state, batch, step)
            torch.cuda.set_sync_debug_mode("warn")
            return moved

        evaluate = task.evaluate

        def stop_watching_then_evaluate(run, state, epoch, last):  # the epoch's steps are over
            torch.cuda.set_sync_debug_mode("default")
            return evaluate(run, state, epoch, last)

        task.to_device, task.evaluate = to_device_then_watch, stop_watching_then_evaluate
        try:
            assert engine.run(task, args) == ExitCode.OK
        finally:
            torch.cuda.set_sync_debug_mode("default")
    syncs = [str(w.message) for w in caught if "synchroniz" in str(w.message)]
    assert steps[0] == 6 and len(syncs) <= steps[0], syncs


def test_resume_on_the_default_path_with_workers_continues_the_same_run(tiny_data, tmp_path, device):
    """The default (non-deterministic) path with a loader worker: a run stopped by SIGTERM and resumed sees the
    same batches and ends at the weights of a straight run, within the run-to-run noise of non-deterministic
    kernels (atol 1e-3 after a few steps of a debug model; bit-exact on CPU)."""
    flags = {"device": str(device), "input_size": 64, "batch_size": 2, "epochs": 2, "warmup_epochs": 1,
             "num_workers": 1, "save_every_steps": 1}
    straight, interrupted = str(tmp_path / "straight"), str(tmp_path / "interrupted")
    run_cli([sys.executable, VIT_SCRIPT, *tiny_run_args(tiny_data[0], straight, **flags)])
    cmd = [sys.executable, VIT_SCRIPT, *tiny_run_args(tiny_data[0], interrupted, **flags)]
    proc = spawn(cmd)
    wait_for_line(proc, r"Epoch: \[1\]\s+\[\s*2/")
    proc.send_signal(signal.SIGTERM)
    rest, _ = proc.communicate(timeout=120)
    assert proc.returncode == ExitCode.PREEMPTED, rest
    resumed = run_cli(cmd)
    assert re.search(r"resumed from .*checkpoint-last.pth: epoch 1, step \d", resumed.stdout), resumed.output
    a, b = last_checkpoint(straight), last_checkpoint(interrupted)
    tolerance = dict(rtol=0, atol=0) if device.type == "cpu" else dict(rtol=1e-3, atol=1e-3)
    for key in a["model"]:
        torch.testing.assert_close(b["model"][key], a["model"][key], **tolerance, msg=key)
