"""The shared pre-training pipeline and loop, used by the ViT and the CNN entry scripts.

run_pretraining reads top to bottom: distributed set-up -> checks -> data -> model -> optimizer ->
resume -> epochs -> checkpoints. train_one_epoch follows MAE's engine: the LR is set every
iteration, gradients accumulate over --accum_iter, and the loss is averaged over processes.
"""
import contextlib
import datetime
import json
import logging
import math
import os
import random
import sys
import time
from dataclasses import dataclass

import numpy as np
import torch
from torch.nn.parallel import DistributedDataParallel

import data as data_lib
from data.sampler import ResumableSampler
from util import checkpoint as ckpt_lib
from util import dist as dist_lib
from util import monitor
from util.args import ExitCode, argument_warnings, resolve_lr, validate_args
from util.host_memory import keep_freed_memory
from util.log import MetricLogger, RunLog, git_commit, seconds_since_start, setup_logging, write_json
from util.lr_sched import adjust_learning_rate
from util.model_api import PretrainModel
from util.optim import build_optimizer, load_optimizer_state
from util.precision import LossScaler, autocast, configure_backends, resolve_precision
from util.preemption import Preempted, PreemptionFlag
from util.vis import save_loss_curve

logger = logging.getLogger(__name__)

INPUT_BOUND_WARNING = 0.3  # data-wait share of step time above which the log warns


class TooManyBadSteps(RuntimeError):
    """--max_bad_steps non-finite steps in a row."""


class SetupError(RuntimeError):
    """Bad input found before training: printed as one clear message, without a traceback."""


@dataclass
class TrainState:
    """What the loop carries across steps and epochs (and what a checkpoint must restore)."""

    epoch: int = 0
    step: int = 0  # next data_iter_step inside `epoch`
    optimizer_steps: int = 0
    bad_steps_total: int = 0  # non-finite loss, or a non-finite gradient without a loss scaler
    scaler_skips_total: int = 0  # fp16: the GradScaler found an overflow, skipped the update and lowered its scale
    bad_steps_in_a_row: int = 0  # either kind; --max_bad_steps stops the run
    replaced_files: int = 0
    preemption_requested: bool = False  # a signal reached some rank; agreed on at each optimizer step
    steps_this_process: int = 0  # optimizer steps since this process started (not checkpointed)


@dataclass(frozen=True)
class Run:
    """Everything built once by run_pretraining and used by the loop (what changes is in TrainState)."""

    args: object
    info: dist_lib.DistInfo
    device: torch.device
    precision: str
    model: torch.nn.Module  # DDP-wrapped when distributed
    model_without_ddp: torch.nn.Module
    optimizer: torch.optim.Optimizer
    scaler: LossScaler
    loader: torch.utils.data.DataLoader
    sampler: ResumableSampler
    steps_per_epoch: int
    data: data_lib.PretrainData
    run_log: RunLog
    preemption: PreemptionFlag


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


PREFETCH_BATCHES = 4  # per worker, when they fit the budget below
# Ready batches sit in shared memory (and, on CUDA, pinned memory). 8 workers x 4 batches of 256 x 3 x 224 x 224 fp32
# would hold 5 GB per rank; the budget keeps it near 1 GiB, and never less than one batch per worker.
PREFETCH_BUDGET_BYTES = 2**30


def batch_bytes(args) -> int:
    """Bytes of one batch as the workers hand it over: uint8 canvases with --gpu_augment, else fp32 images."""
    if args.gpu_augment:
        return args.batch_size * args.gpu_augment_canvas ** 2
    return args.batch_size * args.in_chans * args.input_size ** 2 * 4


def prefetch_batches(args, shm_free_bytes: int | None) -> int | None:
    """Batches each DataLoader worker keeps ready (None without workers): PREFETCH_BATCHES, fewer when all workers'
    batches would pass PREFETCH_BUDGET_BYTES or the free shared memory, at least 1. If one batch per worker does not
    fit in the free shared memory, the run stops here (a DataLoader would die with a bus error mid-epoch)."""
    if args.num_workers == 0:
        return None
    per_round = args.num_workers * batch_bytes(args)  # one ready batch per worker
    fits = PREFETCH_BUDGET_BYTES // per_round
    if shm_free_bytes is not None:
        if shm_free_bytes < per_round:
            raise ValueError(
                f"--num_workers {args.num_workers} x --batch_size {args.batch_size} needs at least "
                f"{per_round / 2**20:.0f} MB of shared memory (/dev/shm), and {shm_free_bytes / 2**20:.0f} MB are "
                "free. Lower --num_workers or --batch_size, use --gpu_augment (uint8 batches), or give the container "
                "more (docker --shm-size 8g).")
        fits = min(fits, shm_free_bytes // per_round)
    return int(min(PREFETCH_BATCHES, max(1, fits)))


def shm_free_bytes() -> int | None:
    """Free bytes of /dev/shm, where DataLoader workers put their batches; None where there is no /dev/shm."""
    try:
        st = os.statvfs("/dev/shm")
    except OSError:
        return None
    return st.f_bavail * st.f_frsize


def build_loader(args, dataset, info: dist_lib.DistInfo, device: torch.device):
    return train_loader(args, dataset, info, device, repeats=3 if args.repeated_aug else 1,
                        prefetch_factor=prefetch_batches(args, shm_free_bytes()))


def train_loader(args, dataset, info: dist_lib.DistInfo, device: torch.device, repeats: int = 1,
                 prefetch_factor: int | None = None, what: str = "the data"):
    """(loader, resumable sampler, steps per epoch) over this rank's shard; used by fine-tuning too."""
    sampler = ResumableSampler(len(dataset), info.world_size, info.rank, shuffle=True, seed=args.seed, repeats=repeats)
    steps = sampler.num_samples // args.batch_size
    if steps == 0:
        raise ValueError(f"--batch_size {args.batch_size} is larger than this rank's share of {what} "
                         f"({sampler.num_samples} images over {info.world_size} process(es)); lower --batch_size")
    if args.max_steps_per_epoch:
        steps = min(steps, args.max_steps_per_epoch * args.accum_iter)
    loader = torch.utils.data.DataLoader(
        dataset, sampler=sampler, batch_size=args.batch_size, num_workers=args.num_workers,
        pin_memory=args.pin_mem and device.type == "cuda", drop_last=True,
        persistent_workers=args.num_workers > 0, prefetch_factor=prefetch_factor,
        # its own generator, so creating an iterator never consumes the global RNG (exact resume)
        generator=torch.Generator().manual_seed(args.seed),
    )
    return loader, sampler, steps


def index_pool(args, info, device) -> data_lib.IndexPool:
    """Rank 0 indexes and checks the data, or reads output_dir's index cache; the other ranks receive its index
    and touch no image file. 8 ranks x N nodes would otherwise stat every image at every start and requeue."""
    cfg = data_lib.data_config(args)
    built = None

    def build() -> bytes:
        nonlocal built
        built = data_lib.build_index_pool(cfg, args.output_dir)
        return built.encode() if info.distributed else b""

    payload = dist_lib.share_from_main(info, device, build)
    return built if info.is_main else data_lib.IndexPool.decode(payload)


def log_resolved(args, info, device, precision, eff_batch_size, steps_per_epoch) -> None:
    summary = {
        "world_size": info.world_size, "launcher": info.source, "device": str(device), "precision": precision,
        "batch_size_per_process": args.batch_size, "accum_iter": args.accum_iter, "eff_batch_size": eff_batch_size,
        "base_lr": args.lr * 256 / eff_batch_size, "actual_lr": args.lr, "steps_per_epoch": steps_per_epoch,
        "epochs": args.epochs, "git": git_commit(),
    }
    logger.info("resolved run: %s", json.dumps(summary))
    logger.info("base lr: %.2e  actual lr: %.2e  effective batch size: %d (= %d per process x %d accum x %d processes)",
                summary["base_lr"], args.lr, eff_batch_size, args.batch_size, args.accum_iter, info.world_size)


def prepare_outputs(args, info) -> None:
    if not info.is_main:
        return
    ckpt_lib.check_writable(args.output_dir)
    if args.log_dir:
        ckpt_lib.check_writable(args.log_dir)
    ckpt_lib.remove_stale_temp_files(args.output_dir)


def gather_rng(run, epoch: int, step: int) -> list:
    """Every rank's RNG state (for rank 0's checkpoint), with a check that DDP kept the weights identical.
    All ranks must call it."""
    rng = [ckpt_lib.rng_state(run.device)]
    if run.info.distributed:  # each rank's RNG, and a checksum of its weights: DDP must have kept them identical
        gathered = [None] * run.info.world_size
        torch.distributed.all_gather_object(gathered, (ckpt_lib.rng_state(run.device),
                                                       weights_checksum(run.model_without_ddp)))
        rng, sums = [g[0] for g in gathered], [g[1] for g in gathered]
        if run.info.is_main and len(set(sums)) > 1:
            logger.error("ranks hold different weights at epoch %d step %d (checksums %s): gradients were not "
                         "all-reduced on some step; the checkpoint holds rank 0's", epoch, step, sums)
    return rng


def checkpoint_state(run: Run, state: TrainState, epoch: int, step: int, epoch_log: dict | None = None) -> dict | None:
    """The checkpoint dict (reference keys first) on rank 0; None elsewhere. All ranks must call it. An end-of-epoch
    checkpoint carries the epoch's log.txt line (epoch_log), which resume restores if log.txt lacks it."""
    rng = gather_rng(run, epoch, step)
    if not run.info.is_main:
        return None
    return ckpt_lib.assemble(run.model_without_ddp, run.optimizer, run.scaler.state_dict(), run.args, epoch, step,
                             rng=rng, world_size=run.info.world_size, norm_stats=run.data.norm_stats,
                             optimizer_steps=state.optimizer_steps, bad_steps_total=state.bad_steps_total,
                             scaler_skips_total=state.scaler_skips_total, epoch_log=epoch_log)


def weights_checksum(model: torch.nn.Module) -> float:
    """Sum of every parameter in float64: equal across ranks exactly when DDP kept the replicas identical."""
    with torch.no_grad():
        return torch.stack([p.double().sum() for p in model.parameters()]).sum().item()


def save(run: Run, state: TrainState, epoch: int, step: int, periodic: bool = False,
         epoch_log: dict | None = None) -> None:
    """checkpoint-last (always) and checkpoint-{epoch} (periodic); rank 0 writes, every rank joins."""
    copy_to = f"checkpoint-{epoch}.pth" if periodic else None
    write_checkpoint(run, checkpoint_state(run, state, epoch, step, epoch_log), copy_to, run.args.keep_last)


def write_checkpoint(run, ckpt: dict | None, copy_to: str | None = None, keep_last: int = 0) -> None:
    """Rank 0 writes `ckpt` as checkpoint-last.pth (and copies it to `copy_to`); every rank joins.

    No rank returns before rank 0's files are complete: a pre-empted rank that exited early would have torchrun or
    srun --kill-on-bad-exit kill rank 0 in the middle of a large write to a network filesystem."""
    error = None
    if ckpt is not None:
        out = run.args.output_dir
        try:
            with dist_lib.Heartbeat.writing:  # a dead peer's verdict waits for the file to be complete
                ckpt_lib.atomic_save(ckpt, os.path.join(out, ckpt_lib.LAST_NAME))
                if copy_to:
                    ckpt_lib.atomic_copy(os.path.join(out, ckpt_lib.LAST_NAME), os.path.join(out, copy_to))
                    ckpt_lib.prune_periodic(out, keep_last)
        except (RuntimeError, OSError) as e:
            error = e
    if run.info.distributed:  # the barrier carries rank 0's outcome, so a failed write stops every rank at once
        failed = torch.tensor([0.0 if error is None else 1.0], device=run.device)
        dist_lib.all_reduce(failed)
        if failed.item() and error is None:
            raise ckpt_lib.CheckpointWriteError(
                "rank 0 could not write the checkpoint (its log says why); the previous one is intact")
    if error is not None:
        raise error


def resume_source(args) -> tuple[str, dict] | None:
    """(path, checkpoint) of --resume, or with --auto_resume the newest good checkpoint in output_dir; None if
    there is none."""
    if args.resume:
        return args.resume, ckpt_lib.load_checkpoint(args.resume)
    if args.auto_resume and os.path.isdir(args.output_dir):
        return ckpt_lib.find_resumable(args.output_dir)
    return None


def resume(run: Run, state: TrainState) -> None:
    """Load --resume, or with --auto_resume the newest good checkpoint in output_dir."""
    args = run.args
    found = resume_source(args)
    if found is None:
        return
    path, ckpt = found
    run.model_without_ddp.load_state_dict(ckpt["model"])
    if "optimizer" in ckpt and "epoch" in ckpt:
        load_optimizer_state(run.optimizer, ckpt["optimizer"], run.model_without_ddp, args.weight_decay,
                             args.decay_tokens, path)
        run.scaler.load_state_dict(ckpt.get("scaler") or {})
        state.epoch, state.step = ckpt_lib.progress_of(ckpt)
        state.optimizer_steps = int(ckpt.get("optimizer_steps", 0))
        state.bad_steps_total = int(ckpt.get("bad_steps_total", 0))
        state.scaler_skips_total = int(ckpt.get("scaler_skips_total", 0))
        rng = ckpt.get("rng")
        if rng and ckpt.get("world_size") == run.info.world_size:
            ckpt_lib.set_rng_state(rng[run.info.rank], run.device, run.info.local_rank)
        elif rng:
            logger.warning("checkpoint was written by %s processes, this run has %d: RNG streams restart from "
                           "the seed", ckpt.get("world_size"), run.info.world_size)
        run.run_log.recover_epoch_line(ckpt.get("epoch_log"))
    logger.info("resumed from %s: epoch %d, step %d", path, state.epoch, state.step)


def log_load_report(source: str, report: dict, kinds=("adapted", "missing", "ignored")) -> None:
    """The counts of a load_pretrained report, then the keys of each of `kinds` (shared with fine-tuning)."""
    logger.info("%s: loaded %d tensors, adapted %d, missing %d (kept their initialisation), ignored %d", source,
                len(report["loaded"]), len(report["adapted"]), len(report["missing"]), len(report["ignored"]))
    for kind in kinds:
        if report[kind]:
            logger.info("  %s: %s", kind, ", ".join(report[kind]))


def init_from(run: Run, state: TrainState) -> None:
    """--init_from, unless this run resumed: load what fits and say exactly what was and was not loaded."""
    path = run.args.init_from
    if not path:
        return
    if state.epoch > 0 or state.step > 0:
        logger.info("--init_from %s ignored: resuming from a checkpoint of this run", path)
        return
    report = run.model_without_ddp.load_pretrained(ckpt_lib.load_checkpoint(path))
    log_load_report(f"--init_from {path}", report)
    if not report["loaded"]:
        raise ValueError(f"--init_from {path}: no tensor matched this model; is it the right architecture?")


def train_one_epoch(run: Run, state: TrainState) -> dict:
    args, model, optimizer = run.args, run.model, run.optimizer
    model.train()
    optimizer.zero_grad(set_to_none=True)
    metric_logger = MetricLogger()
    metric_logger.meters["lr"].fmt = "{value:.3e}"
    header = f"Epoch: [{state.epoch}]"
    accum_iter, steps = args.accum_iter, run.steps_per_epoch
    loss_accum = torch.zeros((), device=run.device)
    start_time, images = time.time(), 0
    batches = metric_logger.log_every(run.loader, args.print_freq, header, total=steps, start=state.step)
    for data_iter_step, (samples, replaced) in batches:
        if data_iter_step >= steps:
            break
        if data_iter_step % accum_iter == 0:
            lr = adjust_learning_rate(optimizer, data_iter_step / steps + state.epoch, args)
        samples = to_device(run, samples, state.epoch, data_iter_step)
        state.replaced_files += int(replaced.sum())
        update = (data_iter_step + 1) % accum_iter == 0
        # DDP all-reduces gradients only on the iteration that steps
        grad_sync = contextlib.nullcontext() if update or not run.info.distributed else model.no_sync()
        with grad_sync:
            with autocast(run.precision, run.device):
                loss, _, _ = model(samples, mask_ratio=args.mask_ratio)
            run.scaler.backward(loss / accum_iter)
        loss_accum += loss.detach().float()
        images += samples.shape[0]
        if not update:
            continue
        loss_value, grad_norm, stepped = optimizer_step(run, state, loss_accum / accum_iter)
        loss_accum.zero_()
        state.steps_this_process += 1
        if state.steps_this_process == 1:  # what a restart or requeue costs before training goes on
            logger.info("start-up: first optimizer step %.1f s after the process started", seconds_since_start())
        state.step = data_iter_step + 1
        epoch_1000x = int((data_iter_step / steps + state.epoch) * 1000)
        run.run_log.scalar("lr", lr, epoch_1000x)
        if stepped:  # a skipped step's inf/nan stays out of the epoch averages
            metric_logger.update(loss=loss_value, lr=lr, grad_norm=grad_norm)
            run.run_log.scalar("train_loss", loss_value, epoch_1000x)
            run.run_log.scalar("grad_norm", grad_norm, epoch_1000x)
        stop_if_asked(run, state, lambda: save(run, state, state.epoch, state.step))
        if args.save_every_steps and state.optimizer_steps % args.save_every_steps == 0 and state.step < steps:
            save(run, state, state.epoch, state.step)
    elapsed = time.time() - start_time
    stats = {k: meter.global_avg for k, meter in metric_logger.meters.items()}
    stats.update(images_per_s=images * run.info.world_size / max(elapsed, 1e-9),
                 data_wait_fraction=metric_logger.data_wait_fraction, bad_steps=state.bad_steps_total,
                 scaler_skips=state.scaler_skips_total, replaced_files=state.replaced_files)
    if run.scaler.enabled:  # read once an epoch: get_scale() waits for the device
        stats["loss_scale"] = run.scaler.scale()
    if run.device.type == "cuda":
        stats["max_memory_mb"] = torch.cuda.max_memory_allocated(run.device) / 2**20
        torch.cuda.reset_peak_memory_stats(run.device)  # each epoch reports its own peak
    if stats["data_wait_fraction"] > INPUT_BOUND_WARNING:
        logger.warning("input-bound: %.0f%% of step time waited for data. Raise --num_workers, or train from "
                       "tools/prepare_data.py output.", 100 * stats["data_wait_fraction"])
    return stats


def stop_if_asked(run, state: TrainState, save_last) -> None:
    """After an optimizer step (both engines): --max_bad_steps non-finite steps in a row, or a pre-emption signal on
    any rank, write checkpoint-last through save_last() and stop."""
    args = run.args
    if state.bad_steps_in_a_row >= args.max_bad_steps:
        save_last()
        raise TooManyBadSteps(
            f"{state.bad_steps_in_a_row} non-finite steps in a row (--max_bad_steps {args.max_bad_steps}). "
            f"checkpoint-last.pth holds the last good weights. Remedies: --precision bf16 (or fp32) instead of "
            f"fp16, a lower --blr, or --clip_grad 1.0; then rerun the same command to resume.")
    if state.preemption_requested:
        save_last()
        raise Preempted(run.preemption.signal_name or "signal on another rank")


def to_device(run: Run, samples, epoch: int, data_iter_step: int) -> torch.Tensor:
    """The batch on the training device; with --gpu_augment, augmented there (seeded, so resume is exact)."""
    if run.data.augment is None:
        return samples.to(run.device, non_blocking=True)
    canvas, hw, source = samples
    seed = (((run.args.seed * 1_000_003 + epoch) * 1_000_003 + data_iter_step) * run.info.world_size
            + run.info.rank) % 2**63
    return run.data.augment(canvas.to(run.device, non_blocking=True), hw, source, seed)


def optimizer_step(run: Run, state: TrainState, loss: torch.Tensor) -> tuple[float, float, bool]:
    """Step unless the loss or gradient is non-finite; one all-reduce and one host sync per step.

    The stop flag travels with the loss so every rank sees a pre-emption signal at the same step. With fp16, a
    non-finite gradient is the GradScaler's overflow: the update is skipped, the scale lowered, and the skip counted
    apart from non-finite losses; both count towards --max_bad_steps, so a collapsing scale stops the run.
    Returns the process-averaged loss, the gradient norm (before clipping) and whether the weights were updated.
    """
    args = run.args
    norm = run.scaler.step_prepare(run.optimizer, run.model.parameters(), args.clip_grad)
    stop = 1.0 if run.preemption.set else 0.0
    # torch.full fills on the device; torch.tensor(stop, device=...) would be a blocking host-to-device copy
    packed = torch.stack([loss.float(), torch.full((), stop, device=run.device), norm.float().to(run.device)])
    dist_lib.all_reduce(packed)
    loss_value, stop_count, norm_value = packed.tolist()
    loss_value /= run.info.world_size
    norm_value /= run.info.world_size
    state.preemption_requested = stop_count > 0
    stepped = math.isfinite(loss_value) and math.isfinite(norm_value)
    if stepped:
        run.scaler.step_apply(run.optimizer)
        state.bad_steps_in_a_row = 0
        state.optimizer_steps += 1
    else:
        run.scaler.step_skip(run.optimizer)  # fp16: lowers the scale
        state.bad_steps_in_a_row += 1
        if run.scaler.enabled and math.isfinite(loss_value):
            state.scaler_skips_total += 1
            logger.info("fp16 gradient overflow at epoch %d step %d: update skipped, loss scale now %g (%d skips in "
                        "total, %d bad steps in a row)", state.epoch, state.step, run.scaler.scale(),
                        state.scaler_skips_total, state.bad_steps_in_a_row)
            run.run_log.scalar("scaler_skips", state.scaler_skips_total, state.optimizer_steps)
        else:
            state.bad_steps_total += 1
            logger.warning("non-finite loss (%s) or gradient norm (%s) at epoch %d step %d: update skipped "
                           "(%d in a row, %d in total)", loss_value, norm_value, state.epoch, state.step,
                           state.bad_steps_in_a_row, state.bad_steps_total)
            run.run_log.scalar("bad_steps", state.bad_steps_total, state.optimizer_steps)
    run.optimizer.zero_grad(set_to_none=True)
    return loss_value, norm_value, stepped


def visualize(run: Run, epoch: int) -> float | None:
    """Reconstruction PNG + TensorBoard image and val_loss on the fixed monitor batch (rank 0)."""
    batch = run.data.monitor
    if batch is None:
        return None
    mean, std = run.data.norm_stats["per_source"][batch.source]
    path = os.path.join(run.args.output_dir, f"reconstruction-{epoch:04d}.png")
    loss, grid = monitor.reconstruction(run.model_without_ddp, batch.images, mean, std, run.args.mask_ratio, path,
                                        f"epoch {epoch}", run.precision, run.device)
    run.run_log.scalar("val_loss", loss, (epoch + 1) * 1000)
    run.run_log.image("reconstruction", np.asarray(grid), (epoch + 1) * 1000)
    logger.info("wrote %s (val_loss %.4f on %d monitor images, fixed mask seed)", path, loss, len(batch.images))
    return loss


def probe(run: Run, epoch: int) -> float | None:
    """Mean AUROC of a linear probe on the frozen encoder (rank 0); logged as probe_auroc."""
    subset = run.data.probe
    value, scored = monitor.probe_auroc(run.model_without_ddp, subset.train, subset.test, run.precision, run.device)
    if value is None:
        logger.info("linear probe: no finding has both classes among the scoring images; nothing to report")
        return None
    run.run_log.scalar("probe_auroc", value, (epoch + 1) * 1000)
    logger.info("linear probe: mean AUROC %.4f over %d findings", value, scored)
    return value


def run_epochs(run: Run, state: TrainState) -> None:
    args = run.args
    for epoch in range(state.epoch, args.epochs):
        state.epoch = epoch
        run.sampler.set_epoch(epoch)
        run.sampler.set_start(state.step * args.batch_size)
        stats = train_one_epoch(run, state)
        state.step = 0
        last = epoch + 1 == args.epochs
        if (args.vis_freq and epoch % args.vis_freq == 0) or last:
            stats["val_loss"] = visualize(run, epoch)
        if run.data.probe is not None and (epoch % args.probe_freq == 0 or last):
            stats["probe_auroc"] = probe(run, epoch)
        log_stats = {**{f"train_{k}": v for k, v in stats.items() if k not in ("val_loss", "probe_auroc")},
                     "epoch": epoch}
        log_stats.update({k: stats[k] for k in ("val_loss", "probe_auroc") if stats.get(k) is not None})
        save(run, state, epoch, 0, periodic=epoch % args.save_freq == 0 or last, epoch_log=log_stats)
        run.run_log.epoch_line(log_stats)
        if run.info.is_main:
            save_loss_curve(os.path.join(args.output_dir, "log.txt"), os.path.join(args.output_dir, "loss_curve.png"))


def run_pretraining(args, build_model, check_model_args=None) -> int:
    """Entry point shared by both scripts; returns the process exit code."""
    return run_reporting_failures(args, lambda info, device: _run(args, info, device, build_model, check_model_args))


def run_reporting_failures(args, body) -> int:
    """Distributed set-up, then body(info, device) -> exit code. Pre-emption, bad input, a failed write, a bad image
    and a dead peer each end in a one-line report and their exit code (PRETRAIN.md section 6), on every rank."""
    info, device = dist_lib.init_distributed(args)
    setup_logging(None, info.rank)  # console only until output_dir has passed its write probe
    logger.info("%s", dist_lib.describe(info))
    try:
        if info.distributed:
            logger.info("%d process(es) on %s", info.world_size, dist_lib.host_layout(info))
        return body(info, device)
    except Preempted as e:
        logger.warning("pre-empted (%s): checkpoint-last written; exiting with %d so the job can be requeued",
                       e, ExitCode.PREEMPTED)
        return ExitCode.PREEMPTED
    except TooManyBadSteps as e:
        logger.error("%s", e)
        return ExitCode.TOO_MANY_BAD_STEPS
    except SetupError as e:
        logger.error("error: %s", e.__cause__ or e)
        return ExitCode.FAILED
    except ckpt_lib.CheckpointWriteError as e:
        logger.error("error: %s", e)
        return ExitCode.FAILED
    except data_lib.BadImageError as e:
        logger.error("error: %s (checkpoint-last.pth, if any, is intact; rerun to resume)", e)
        return ExitCode.FAILED
    except RuntimeError as e:
        if not (info.distributed and dist_lib.is_communication_failure(e)):
            raise
        logger.error("rank %d: a collective failed (%s). %s. Each rank's log is in output_dir/logs/ "
                     "(rank 0) or on its console.", info.rank, str(e).splitlines()[0], dist_lib.peer_report())
        return ExitCode.FAILED
    finally:
        dist_lib.cleanup()


def _run(args, info, device, build_model, check_model_args) -> int:
    problems = data_lib.check_data_args(args) + (check_model_args(args) if check_model_args else [])
    validate_args(args, problems)
    if info.is_main:
        for warning in argument_warnings(args):
            logger.warning("%s", warning)
    try:
        prepare_outputs(args, info)
        setup_logging(args.output_dir if info.is_main else None, info.rank)
        pretrain_data = data_lib.build_pretrain_data(
            data_lib.data_config(args), monitor=info.is_main,
            probe_images=args.probe_images if info.is_main and args.probe_freq > 0 else 0,
            pool=index_pool(args, info, device))
        loader, sampler, steps = build_loader(args, pretrain_data.dataset, info, device)
    except (OSError, ValueError, RuntimeError) as e:  # missing data, bad metadata, leakage, unwritable output
        raise SetupError(str(e)) from e
    seed_everything(args.seed + info.rank)
    if info.is_main:
        logger.info("%s", data_lib.format_count_tree(pretrain_data.counts))
        write_json(os.path.join(args.output_dir, "data_counts.json"), pretrain_data.counts)
    precision = resolve_precision(args.precision, device)
    configure_backends(device, args.deterministic)
    if args.keep_freed_memory and device.type == "cpu" and keep_freed_memory():
        logger.info("CPU run: freed memory stays in the process for reuse (--no_keep_freed_memory to give it back)")
    eff_batch_size = resolve_lr(args, info.world_size)
    log_resolved(args, info, device, precision, eff_batch_size, steps // args.accum_iter)
    model = build_model(args)
    if not isinstance(model, PretrainModel):
        raise TypeError(f"{type(model).__name__} lacks members of util.model_api.PretrainModel, the contract the "
                        "engine, the monitor and the tools rely on")
    model = model.to(device)
    model_without_ddp = model
    if args.compile:
        model = torch.compile(model)
    optimizer = build_optimizer(model_without_ddp, args.weight_decay, args.lr, device, args.decay_tokens)
    if info.distributed:  # every rank then loads the same --resume/--init_from weights into model_without_ddp
        model = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
        # registers itself; dist_lib.cleanup() stops it
        dist_lib.Heartbeat(info, args.dist_timeout, args.heartbeat_timeout, ExitCode.FAILED)
    run = Run(args=args, info=info, device=device, precision=precision, model=model,
              model_without_ddp=model_without_ddp, optimizer=optimizer, scaler=LossScaler(precision, device),
              loader=loader, sampler=sampler, steps_per_epoch=steps, data=pretrain_data,
              run_log=RunLog(args.output_dir, args.log_dir, info.is_main), preemption=PreemptionFlag().install())
    state = TrainState(epoch=args.start_epoch)
    try:
        resume(run, state)
        init_from(run, state)
    except (OSError, ValueError, RuntimeError, KeyError) as e:  # missing, unsafe or mismatched checkpoint
        raise SetupError(f"--resume/--auto_resume/--init_from: {e}") from e
    if info.is_main:
        write_json(os.path.join(args.output_dir, "args.json"), vars(args))
    logger.info("model: %s, %.1fM parameters; start at epoch %d step %d", args.model,
                sum(p.numel() for p in model_without_ddp.parameters()) / 1e6, state.epoch, state.step)
    start = time.time()
    run_epochs(run, state)
    run.run_log.close()
    logger.info("training time %s", datetime.timedelta(seconds=int(time.time() - start)))
    return ExitCode.OK


def main(args, build_model, check_model_args=None) -> None:
    sys.exit(run_pretraining(args, build_model, check_model_args))


def cli_main(parser, model_names, build_model, check_model_args) -> None:
    """Parse, answer --model list, and run: the whole body of each entry script."""
    args = parser.parse_args()
    if args.model == "list":
        print("\n".join(model_names))
        sys.exit(ExitCode.OK)
    main(args, build_model, check_model_args)
