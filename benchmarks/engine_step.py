"""The engine's real training step, timed on a batch already on the device (no data loading).

engine.train_one_epoch runs exactly as in training: the LR schedule, autocast, the loss scaler (fp16 gets
its GradScaler), the gradient norm, the all-reduce of loss + stop flag + norm (a no-op at world size 1), one host
sync per step, and the fused AdamW step. Only the loader is replaced by the same device batch, so the numbers are
the model's ceiling, which the end-to-end runs of benchmarks/gpu_check.py compare against.

A first epoch warms up (torch.compile builds its graphs once, cuDNN autotunes, the allocator fills); the second is
timed. Used by benchmarks/bench_step.py and benchmarks/gpu_check.py.
"""
import argparse
import logging
from types import SimpleNamespace

import torch
from torch.utils.flop_counter import FlopCounterMode

import engine
import main_pretrain_multi_datasets_xray as vit_main
import main_pretrain_multi_datasets_xray_cnn as cnn_main
from engine_pretrain import PretrainTask
from util.dist import DistInfo
from util.log import RunLog
from util.optim import build_optimizer
from util.precision import LossScaler, autocast, configure_backends
from util.preemption import PreemptionFlag

SCRIPTS = {"vit": vit_main, "cnn": cnn_main}


def entry_args(kind: str, model: str, batch: int, precision: str, input_size: int, mask_ratio: float,
               compile_model: bool = False) -> argparse.Namespace:
    """The entry script's parsed flags for this configuration (every other flag at its default)."""
    argv = ["--model", model, "--batch_size", str(batch), "--precision", precision, "--input_size", str(input_size),
            "--mask_ratio", str(mask_ratio), "--epochs", "2", "--warmup_epochs", "1", "--print_freq", "1000000"]
    args = argparse.ArgumentParser(parents=[SCRIPTS[kind].get_args_parser()]).parse_args(
        argv + (["--compile"] if compile_model else []))
    args.lr = args.blr * batch / 256
    return args


def flops_per_step(model: torch.nn.Module, images: torch.Tensor, precision: str, device: torch.device) -> int:
    """Forward + backward FLOPs of one batch, counted by PyTorch's FlopCounterMode (matmuls, convolutions,
    attention). Runs the eager model; the weights' gradients are discarded."""
    with FlopCounterMode(display=False) as counter:
        with autocast(precision, device):
            loss, _, _ = model(images)
        loss.backward()
    model.zero_grad(set_to_none=True)
    return counter.get_total_flops()


def model_only(kind: str, model: str, device: torch.device, precision: str, batch: int, steps: int,
               compile_model: bool = False, input_size: int = 224, mask_ratio: float = 0.75) -> dict:
    """images/s, data-wait share, peak memory and FLOPs per image of the engine's step on a device batch."""
    args = entry_args(kind, model, batch, precision, input_size, mask_ratio, compile_model)
    configure_backends(device)
    torch.manual_seed(0)
    net = SCRIPTS[kind].build_model(args).to(device)
    optimizer = build_optimizer(net, args.weight_decay, args.lr, device, args.decay_tokens)
    images = torch.randn(batch, args.in_chans, input_size, input_size, device=device)
    batches = [(images, torch.zeros(batch, dtype=torch.bool))] * steps  # (images, replaced-file flags)
    data = engine.TaskData(train=batches, name="one device batch", batch_bytes=0,
                           extra=SimpleNamespace(augment=None))  # what PretrainTask.to_device reads
    run = engine.Run(
        args=args, task=PretrainTask(SCRIPTS[kind].build_model), info=DistInfo(), device=device, precision=precision,
        model=torch.compile(net) if compile_model else net, model_without_ddp=net, optimizer=optimizer,
        scaler=LossScaler(precision, device), loader=batches, sampler=None, steps_per_epoch=steps, data=data,
        run_log=RunLog(None, None, enabled=False), preemption=PreemptionFlag())
    state = engine.TrainState()
    quiet = logging.getLogger("util.log")
    level = quiet.level
    quiet.setLevel(logging.WARNING)  # the per-epoch "Total time" lines
    try:
        engine.train_one_epoch(run, state)  # warm-up
        if device.type == "cuda":
            torch.cuda.synchronize(device)
            torch.cuda.reset_peak_memory_stats(device)
        state.epoch, state.step = 1, 0
        stats = engine.train_one_epoch(run, state)
    finally:
        quiet.setLevel(level)
    return {"images_per_s": stats["images_per_s"], "data_wait_fraction": stats["data_wait_fraction"],
            "max_memory_mb": stats.get("max_memory_mb"), "loss": stats.get("loss"),
            "flops_per_image": flops_per_step(net, images, precision, device) / batch}
