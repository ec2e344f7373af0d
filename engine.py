"""The shared training run: what every task needs, written once. A task supplies only what differs (class Task).

    engine.run(task, args) -> exit code

reads top to bottom, in one fixed order for every task:
    flags checked -> distributed set-up -> the run in output_dir compared with this one (before anything is written
    there) -> output folder and logging -> the task's data and train loader -> seed ->
    precision, backends, LR -> the resolved-run record -> model -> optimizer -> torch.compile -> DDP -> heartbeat ->
    pre-emption handler -> resume (or the task's initial weights) -> epochs -> the task's final outputs.
Each epoch: train (per-iteration LR, autocast, accumulation, the non-finite guard, one host sync per optimizer step),
then the task's evaluation, the selection of the best epoch (when the task selects one), the checkpoint, and the
epoch's log.txt line. Pre-training (engine_pretrain.py) and classification (engine_finetune.py) are tasks.
"""
import contextlib
import dataclasses
import datetime
import hashlib
import itertools
import json
import logging
import math
import os
import random
import time
from dataclasses import dataclass, field

import numpy as np
import torch
from torch.nn.parallel import DistributedDataParallel

from data.base import BadImageError
from data.sampler import ResumableSampler
from util import checkpoint as ckpt_lib
from util import dist as dist_lib
from util.args import ExitCode, argument_warnings, resolve_lr, validate_args
from util.errors import SetupError
from util.host_memory import keep_freed_memory
from util.log import MetricLogger, RunLog, git_commit, seconds_since_start, setup_logging, write_json
from util.lr_sched import adjust_learning_rate
from util.precision import LossScaler, autocast, configure_backends, resolve_precision
from util.preemption import Preempted, PreemptionFlag
from util.prefetch import on_device

logger = logging.getLogger(__name__)

INPUT_BOUND_WARNING = 0.3  # data-wait share of step time above which the log warns
# What a user's input can raise while the run is set up (missing or unreadable files, bad lists and flags, a
# checkpoint of another run, rank 0's failure relayed to the others): reported as one line, never a traceback.
SETUP_ERRORS = (OSError, ValueError, SetupError)


class TooManyBadSteps(RuntimeError):
    """--max_bad_steps non-finite steps in a row."""


# ---- state ------------------------------------------------------------------------------------------------------

def checkpointed(default=None, *, default_factory=None, older_key: str | None = None):
    """A TrainState field that a checkpoint saves under its own name and resume restores (older_key: the name an
    earlier version of this project saved it under, still read)."""
    metadata = {"checkpoint": True, "older_key": older_key}
    if default_factory is not None:
        return field(default_factory=default_factory, metadata=metadata)
    return field(default=default, metadata=metadata)


@dataclass
class TrainState:
    """What the loop carries across steps and epochs. Fields made with checkpointed() go into every checkpoint and
    come back on resume; the others live as long as the process. epoch and step are the checkpoint's own keys."""

    epoch: int = 0
    step: int = 0  # next data_iter_step inside `epoch`
    optimizer_steps: int = checkpointed(0)
    bad_steps_total: int = checkpointed(0)  # non-finite loss, or a non-finite gradient without a loss scaler
    scaler_skips_total: int = checkpointed(0)  # fp16: the GradScaler found an overflow and lowered its scale
    bad_steps_in_a_row: int = 0  # either kind; --max_bad_steps stops the run
    replaced_files: int = 0  # --bad_files skip: bad images replaced by the next one, this process
    preemption_requested: bool = False  # a signal reached some rank; agreed on at each optimizer step
    steps_this_process: int = 0  # optimizer steps since this process started

    def checkpoint_fields(self) -> dict:
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.metadata.get("checkpoint")}

    def restore(self, ckpt: dict) -> None:
        """Progress and every checkpointed field the checkpoint holds (an older checkpoint may lack some)."""
        self.epoch, self.step = ckpt_lib.progress_of(ckpt)
        for f in dataclasses.fields(self):
            if not f.metadata.get("checkpoint"):
                continue
            for key in (f.name, f.metadata.get("older_key")):
                if key in ckpt:
                    setattr(self, f.name, ckpt[key])
                    break


@dataclass
class SelectionState(TrainState):
    """TrainState of a task that selects its best epoch on validation (Task.selection)."""

    best_score: float | None = checkpointed(None, older_key="best_auroc")  # the selecting metric's best value
    best_epoch: int | None = checkpointed(None)
    val_history: list = checkpointed(default_factory=list)  # [epoch, selecting metric] per evaluation
    scores_since_best: int = checkpointed(0)
    stopped_early: bool = checkpointed(False)  # --patience ended the run before --epochs


@dataclass(frozen=True)
class Selection:
    """Which evaluation number selects the best epoch (checkpoint-best.pth), and in which direction."""

    metric: str  # a key of Task.evaluate's result, e.g. "val_auroc"
    higher_is_better: bool = True
    description: str = ""  # for logs and results, e.g. "mean validation AUROC"

    def improves(self, value: float, best: float | None) -> bool:
        return best is None or (value > best if self.higher_is_better else value < best)


@dataclass
class TaskData:
    """What a task's build_data hands the engine: the training set and how to load it; `extra` is the task's own."""

    train: torch.utils.data.Dataset  # indexed by (index, seed) pairs: data.sampler.ResumableSampler seeds each sample
    name: str  # for messages: "the training list"
    batch_bytes: int  # bytes of one batch as the loader workers hand it over (shared-memory budget)
    repeats: int = 1  # repeated augmentation: each sample this many times per epoch across ranks
    extra: object = None


# ---- the task contract ------------------------------------------------------------------------------------------

class Task:
    """What a task supplies; engine.run calls these, in this order. Override what differs; the defaults are the
    common case. A task object lives for one run and may keep what it built (its splits, its load report).

    name: written into checkpoints as "task" and checked on resume (None: pre-training, whose checkpoints keep the
    reference's keys). state_class: TrainState, or a subclass with more checkpointed() fields. selection: None, or
    what selects the best epoch (then state_class must derive from SelectionState).
    """

    name: str | None = None
    state_class: type = TrainState
    selection: Selection | None = None
    weights_flag: str | None = None  # the flag that takes another task's checkpoint as starting weights

    def check_args(self, args) -> list[str]:
        """Problems with this task's own flags (the common ones are checked by util.args.validate_args)."""
        return []

    def identity(self, args) -> dict:
        """This task's part of the run identity: the flags (and list contents, file_fingerprint) that change what is
        trained or scored. A rerun into the same --output_dir must match them (engine.check_same_run)."""
        return {}

    def evaluation_only(self, args) -> bool:
        """True when this run only scores a checkpoint (resume then loads the weights alone; no epochs run)."""
        return False

    def build_data(self, args, info: dist_lib.DistInfo, device: torch.device) -> TaskData:
        raise NotImplementedError

    def describe_data(self, args, info, data: TaskData) -> None:
        """Log what was found (counts per split or source), after logging is set up."""

    def build_model(self, args) -> torch.nn.Module:
        raise NotImplementedError

    def build_optimizer(self, args, model: torch.nn.Module, device: torch.device) -> torch.optim.Optimizer:
        raise NotImplementedError

    def load_optimizer_state(self, run: "Run", state_dict: dict, path: str) -> None:
        run.optimizer.load_state_dict(state_dict)

    def initialise(self, run: "Run", state: TrainState) -> None:
        """A fresh start (nothing resumed): load the initial weights (--finetune, --init_from)."""

    def check_before_writing(self, args, found: tuple[str, dict] | None) -> bool:
        """Before anything is written into --output_dir, with the checkpoint this run would resume (or None): False
        when the run there is complete and nothing is to be done; SetupError to refuse the command."""
        return True

    def before_epochs(self, run: "Run", state: TrainState, resumed: dict | None) -> bool:
        """After resume; False when there is nothing to train (the run is complete, or evaluation only)."""
        return True

    def set_train_mode(self, run: "Run") -> None:
        run.model.train()

    def to_device(self, run: "Run", state: TrainState, batch, step: int) -> tuple:
        """The loader's batch on the training device, augmented there if the task does that; outside autocast.
        The first element is the image batch (its length counts the images). Runs one step ahead of training (on a
        side stream on CUDA): it must not change state (see count)."""
        raise NotImplementedError

    def loss(self, run: "Run", batch: tuple) -> torch.Tensor:
        """The scalar loss of a device batch through run.model (under autocast)."""
        raise NotImplementedError

    def count(self, state: TrainState, batch: tuple) -> None:
        """Once a device batch has been trained on: its per-batch counters into state (not in to_device, which runs
        a step ahead: a batch prepared and never trained must not count)."""

    def evaluate(self, run: "Run", state: TrainState, epoch: int, last: bool) -> dict:
        """Every rank, after an epoch's training: {name: value} for the epoch line (None values are left out); it
        must hold self.selection.metric on the epochs the task scores."""
        return {}

    def checkpoint_extra(self, run: "Run") -> dict:
        """Keys of this task's checkpoints beyond the engine's."""
        return {}

    def periodic_checkpoint(self, args, epoch: int, last: bool) -> bool:
        """Whether this epoch also gets a checkpoint-{epoch}.pth (--save_freq; --keep_last prunes them)."""
        return bool(args.save_freq) and (epoch % args.save_freq == 0 or last)

    def after_epoch(self, run: "Run", state: TrainState) -> None:
        """Rank 0, after the epoch's checkpoint and log line: curves and other per-epoch files."""

    def finish(self, run: "Run", state: TrainState) -> None:
        """After the last epoch (every rank): the task's final outputs."""


class ScoredOnceTask(Task):
    """A Task that selects on validation and scores its test list once, after training (classification,
    segmentation): --eval scores the --resume checkpoint instead of training, into a folder without results and with
    the run's own test-time settings; a complete run (its results_name written) is not trained or scored again.
    Subclasses give score_test(run, state, weights), results_name and eval_settings."""

    results_name = "results.json"  # written last: its presence means the run is complete and its test list scored
    eval_settings: tuple[str, ...] = ()  # the flags that decide how test images are prepared: --eval must keep them

    def evaluation_only(self, args) -> bool:
        return args.eval

    def check_before_writing(self, args, found: tuple[str, dict] | None) -> bool:
        if args.eval:
            if os.path.isfile(os.path.join(args.output_dir, self.results_name)):
                raise SetupError(f"--eval: {args.output_dir} already holds {self.results_name}; give the evaluation "
                                 "its own --output_dir, so no result is overwritten")
            check_eval_settings(args, *found, self.eval_settings)
            return True
        if not already_scored(args, found, self.results_name):
            return True
        self.complete_outputs(args)
        return False

    def complete_outputs(self, args) -> None:
        """A complete run's command again: draw again whatever output file a kill left missing (nothing is scored)."""

    def before_epochs(self, run: "Run", state: TrainState, resumed: dict | None) -> bool:
        if not run.args.eval:
            return True
        state.restore(resumed)  # the selection and the load report, as recorded (older key names too)
        if "best_epoch" not in resumed:  # a checkpoint without a selection record: the epoch it was written at
            state.best_epoch = resumed.get("epoch")
        self.score_test(run, state, None)
        return False

    def score_test(self, run: "Run", state: TrainState, weights: str | None) -> None:
        """Score the test list once with the `weights` checkpoint (None: --eval's --resume, already loaded) and write
        the results, results_name last."""
        raise NotImplementedError


@dataclass(frozen=True)
class Run:
    """Everything built once by the engine and used by the loop and the task (what changes is in TrainState)."""

    args: object
    task: Task
    info: dist_lib.DistInfo
    device: torch.device
    precision: str
    model: torch.nn.Module  # compiled and DDP-wrapped as asked
    model_without_ddp: torch.nn.Module  # what checkpoints hold
    optimizer: torch.optim.Optimizer
    scaler: LossScaler
    loader: object
    sampler: ResumableSampler | None
    steps_per_epoch: int
    data: TaskData
    run_log: RunLog
    preemption: PreemptionFlag
    identity: dict = field(default_factory=dict)  # run_identity(), written into every checkpoint


# ---- set-up -----------------------------------------------------------------------------------------------------

def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


PREFETCH_BATCHES = 4  # per worker, when they fit the budget below
# Ready batches sit in shared memory (and, on CUDA, pinned memory). 8 workers x 4 batches of 256 x 3 x 224 x 224 fp32
# would hold 5 GB per rank; the budget keeps it near 1 GiB, and never less than one batch per worker.
PREFETCH_BUDGET_BYTES = 2**30


def prefetch_batches(args, batch_bytes: int, shm_free_bytes: int | None, ranks_per_node: int = 1) -> int | None:
    """Batches each DataLoader worker keeps ready (None without workers): PREFETCH_BATCHES, fewer when this rank's
    workers' batches would pass PREFETCH_BUDGET_BYTES, or when the node's ranks together would pass the free shared
    memory (/dev/shm is one per node, shared by all its ranks), at least 1. If one batch per worker of every rank on
    the node does not fit, the run stops here (a DataLoader would die with a bus error mid-epoch)."""
    if args.num_workers == 0:
        return None
    per_round = args.num_workers * batch_bytes  # one ready batch per worker of this rank
    fits = PREFETCH_BUDGET_BYTES // per_round
    if shm_free_bytes is not None:
        node_round = ranks_per_node * per_round
        if shm_free_bytes < node_round:
            wanted = ranks_per_node * args.num_workers * PREFETCH_BATCHES * batch_bytes
            raise ValueError(
                f"--num_workers {args.num_workers} x --batch_size {args.batch_size} on {ranks_per_node} rank(s) of "
                f"this node needs at least {node_round / 2**20:.0f} MB of shared memory (/dev/shm), and "
                f"{shm_free_bytes / 2**20:.0f} MB are free. Lower --num_workers or --batch_size, use --gpu_augment "
                f"(uint8 batches), or give the container more: docker --shm-size {math.ceil(wanted / 2**30) + 1}g "
                f"holds the full prefetch of every rank.")
        fits = min(fits, shm_free_bytes // node_round)
    return int(min(PREFETCH_BATCHES, max(1, fits)))


def shm_free_bytes() -> int | None:
    """Free bytes of /dev/shm, where DataLoader workers put their batches; None where there is no /dev/shm."""
    try:
        st = os.statvfs("/dev/shm")
    except OSError:
        return None
    return st.f_bavail * st.f_frsize


def train_loader(args, data: TaskData, info: dist_lib.DistInfo, device: torch.device):
    """(loader, resumable sampler, steps per epoch) over this rank's shard of data.train."""
    sampler = ResumableSampler(len(data.train), info.world_size, info.rank, shuffle=True, seed=args.seed,
                               repeats=data.repeats)
    steps = sampler.num_samples // args.batch_size
    if steps == 0:
        raise ValueError(f"--batch_size {args.batch_size} is larger than this rank's share of {data.name} "
                         f"({sampler.num_samples} images over {info.world_size} process(es)); lower --batch_size")
    if args.max_steps_per_epoch:
        steps = min(steps, args.max_steps_per_epoch * args.accum_iter)
    prefetch = prefetch_batches(args, data.batch_bytes, shm_free_bytes(), dist_lib.ranks_on_this_node(info))
    loader = torch.utils.data.DataLoader(
        data.train, sampler=sampler, batch_size=args.batch_size, num_workers=args.num_workers,
        pin_memory=args.pin_mem and device.type == "cuda", drop_last=True,
        persistent_workers=args.num_workers > 0, prefetch_factor=prefetch,
        # its own generator, so creating an iterator never consumes the global RNG (exact resume)
        generator=torch.Generator().manual_seed(args.seed),
    )
    return loader, sampler, steps


def check_outputs_writable(args, info) -> None:
    """Rank 0: output_dir and log_dir take a write probe before any compute (the probe file is removed again)."""
    if info.is_main:
        ckpt_lib.check_writable(args.output_dir)
        if args.log_dir:
            ckpt_lib.check_writable(args.log_dir)


def log_resolved(args, task: Task, info, device, precision, eff_batch_size, steps_per_epoch) -> None:
    """The derived values, logged as one JSON record (with the git commit) and as a line a person reads."""
    summary = {
        "task": task.name or "pretrain", "model": args.model, "world_size": info.world_size,
        "launcher": info.source, "device": str(device), "precision": precision,
        "batch_size_per_process": args.batch_size, "accum_iter": args.accum_iter, "eff_batch_size": eff_batch_size,
        "base_lr": args.lr * 256 / eff_batch_size, "actual_lr": args.lr, "steps_per_epoch": steps_per_epoch,
        "epochs": args.epochs, "git": git_commit(),
    }
    logger.info("resolved run: %s", json.dumps(summary))
    logger.info("base lr: %.2e  actual lr: %.2e  effective batch size: %d (= %d per process x %d accum x %d processes)",
                summary["base_lr"], args.lr, eff_batch_size, args.batch_size, args.accum_iter, info.world_size)


def build_run(task: Task, args, info, device, identity: dict) -> Run:
    """Everything of the run set-up order after the flags and the resume source: see the module docstring."""
    if info.is_main:
        ckpt_lib.remove_stale_temp_files(args.output_dir)
    setup_logging(args.output_dir if info.is_main else None, info.rank)
    if info.is_main:
        for warning in argument_warnings(args):
            logger.warning("%s", warning)
    data = task.build_data(args, info, device)
    loader, sampler, steps = train_loader(args, data, info, device)
    task.describe_data(args, info, data)
    seed_everything(args.seed + info.rank)
    precision = resolve_precision(args.precision, device)
    configure_backends(device, args.deterministic)
    if args.keep_freed_memory and device.type == "cpu" and keep_freed_memory():
        logger.info("CPU run: freed memory stays in the process for reuse (--no_keep_freed_memory to give it back)")
    eff_batch_size = resolve_lr(args, info.world_size)
    log_resolved(args, task, info, device, precision, eff_batch_size, steps // args.accum_iter)
    model_without_ddp = task.build_model(args).to(device)
    optimizer = task.build_optimizer(args, model_without_ddp, device)
    model = torch.compile(model_without_ddp) if args.compile else model_without_ddp
    if info.distributed:  # every rank then loads the same weights into model_without_ddp
        model = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
        # registers itself; dist_lib.cleanup() stops it
        dist_lib.Heartbeat(info, args.dist_timeout, args.heartbeat_timeout, ExitCode.FAILED)
    return Run(args=args, task=task, info=info, device=device, precision=precision, model=model,
               model_without_ddp=model_without_ddp, optimizer=optimizer, scaler=LossScaler(precision, device),
               loader=loader, sampler=sampler, steps_per_epoch=steps, data=data,
               run_log=RunLog(args.output_dir, args.log_dir, info.is_main), preemption=PreemptionFlag().install(),
               identity=identity)


# ---- checkpoints ------------------------------------------------------------------------------------------------

def weights_checksum(model: torch.nn.Module) -> float:
    """Sum of every parameter in float64: equal across ranks exactly when DDP kept the replicas identical."""
    with torch.no_grad():
        return torch.stack([p.double().sum() for p in model.parameters()]).sum().item()


def gather_rng(run: Run, epoch: int, step: int) -> list:
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
        elif run.info.is_main:
            logger.info("all %d ranks hold the same weights at epoch %d step %d (checksum %.17g)", len(sums), epoch,
                        step, sums[0])
    return rng


def checkpoint_state(run: Run, state: TrainState, epoch: int, step: int, epoch_log: dict | None = None) -> dict | None:
    """The checkpoint dict (reference keys first) on rank 0; None elsewhere. All ranks must call it. An end-of-epoch
    checkpoint carries the epoch's log.txt line (epoch_log), which resume restores if log.txt lacks it."""
    rng = gather_rng(run, epoch, step)
    if not run.info.is_main:
        return None
    task_keys = {"task": run.task.name} if run.task.name else {}
    return ckpt_lib.assemble(run.model_without_ddp, run.optimizer, run.scaler.state_dict(), run.args, epoch, step,
                             rng=rng, world_size=run.info.world_size, **task_keys, **run.task.checkpoint_extra(run),
                             **state.checkpoint_fields(), run_identity=run.identity, epoch_log=epoch_log)


def save(run: Run, state: TrainState, epoch: int, step: int, periodic: bool = False, best: bool = False,
         epoch_log: dict | None = None) -> None:
    """checkpoint-last.pth (always), copied to checkpoint-{epoch}.pth (periodic) and checkpoint-best.pth (best);
    rank 0 writes, every rank joins."""
    copies = ([f"checkpoint-{epoch}.pth"] if periodic else []) + ([ckpt_lib.BEST_NAME] if best else [])
    write_checkpoint(run, checkpoint_state(run, state, epoch, step, epoch_log), copies)


def write_checkpoint(run: Run, ckpt: dict | None, copies: list[str]) -> None:
    """Rank 0 writes `ckpt` as checkpoint-last.pth and copies it to each of `copies`; every rank joins.

    No rank returns before rank 0's files are complete: a pre-empted rank that exited early would have torchrun or
    srun --kill-on-bad-exit kill rank 0 in the middle of a large write to a network filesystem."""
    error = None
    if ckpt is not None:
        out = run.args.output_dir
        try:
            with dist_lib.Heartbeat.writing:  # a dead peer's verdict waits for the file to be complete
                ckpt_lib.atomic_save(ckpt, os.path.join(out, ckpt_lib.LAST_NAME))
                for name in copies:
                    ckpt_lib.atomic_copy(os.path.join(out, ckpt_lib.LAST_NAME), os.path.join(out, name))
                if copies:
                    ckpt_lib.prune_periodic(out, run.args.keep_last)
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


def file_fingerprint(path: str | None) -> str | None:
    """A list or CSV named by a flag, as the run identity records it: its path and the hash of its content (so an
    edited list with the same name is another run)."""
    if not path or not os.path.isfile(path):
        return path or None
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(2**20), b""):
            digest.update(block)
    return f"{os.path.abspath(path)} (sha256 {digest.hexdigest()[:16]})"


def inside(path: str, folder: str) -> bool:
    return os.path.commonpath([os.path.abspath(path), os.path.abspath(folder)]) == os.path.abspath(folder)


def run_identity(task: "Task", args) -> dict:
    """What makes a run this run (checkpointed as run_identity): the task, model and input, where its weights came
    from, and the task's own data and settings (Task.identity). A rerun into the same --output_dir must match it.
    A --resume file inside output_dir continues this run and is not part of it; one from elsewhere is."""
    foreign = args.resume and not inside(args.resume, args.output_dir)
    return {"task": task.name or "pretrain", "model": args.model, "input_size": args.input_size,
            "in_chans": args.in_chans, "resume": os.path.abspath(args.resume) if foreign else None,
            **task.identity(args)}


def check_same_run(path: str, ckpt: dict, now: dict, args) -> None:
    """The run in --output_dir (its checkpoint `path`) was started with the same identity as this command; else
    refused naming every difference, unless --resume_with_changes."""
    stored = ckpt.get("run_identity")
    if stored is None:
        logger.info("%s records no run identity (written before identities were kept): flags not compared", path)
        return
    differ = {k: (stored[k], now[k]) for k in now if k in stored and stored[k] != now[k]}
    if not differ:
        return
    listing = "; ".join(f"{'--' + k if k != 'task' else 'the task'}: {old!r} there, {new!r} now"
                        for k, (old, new) in differ.items())
    if args.resume_with_changes:
        logger.warning("--resume_with_changes: continuing %s although %s", path, listing)
        return
    raise SetupError(f"--output_dir {args.output_dir} holds another run ({path}): {listing}. Give this run its own "
                     "--output_dir, or pass --resume_with_changes to continue that run with the new flags.")


def holds_a_run(folder: str) -> str | None:
    """The file that shows `folder` holds a run's outputs (a checkpoint, or log.txt lines), or None."""
    if not os.path.isdir(folder):
        return None
    checkpoints = ckpt_lib.candidates(folder)
    if checkpoints:
        return checkpoints[0]
    log = os.path.join(folder, "log.txt")
    return log if os.path.isfile(log) and os.path.getsize(log) > 0 else None


def resume_source(task: "Task", args, now: dict) -> tuple[str, dict] | None:
    """Where this run starts from, (path, checkpoint), or None for a fresh start. The run already in --output_dir
    comes first (auto-resume; a requeued job with --resume continues its own progress), after its identity is
    compared with `now` (run_identity); a --resume from elsewhere starts a new run only in a folder that holds none.
    Nothing is ever written over another run's outputs: this runs before any file is written into --output_dir."""
    out = args.output_dir
    existing = holds_a_run(out)
    if task.evaluation_only(args):
        if existing:
            raise SetupError(f"--eval writes results.json and the predictions into --output_dir, which holds a run "
                             f"({existing}); give the evaluation its own --output_dir")
        return args.resume, ckpt_lib.load_checkpoint(args.resume, args.unsafe_full_unpickle)
    if args.resume and inside(args.resume, out):  # this run's own checkpoint, chosen by hand
        ckpt = ckpt_lib.load_checkpoint(args.resume, args.unsafe_full_unpickle)
        check_same_run(args.resume, ckpt, now, args)
        return args.resume, ckpt
    if existing and args.auto_resume:
        found = ckpt_lib.find_resumable(out)
        if found is None:
            raise SetupError(f"--output_dir {out} holds a run ({existing}) but no checkpoint that loads; give this "
                             "run another --output_dir (or remove that folder's files yourself)")
        check_same_run(*found, now, args)
        return found
    if existing:
        raise SetupError(f"--output_dir {out} holds a run ({existing}) and --no_auto_resume would start over it; "
                         "give this run another --output_dir")
    if args.resume:
        return args.resume, ckpt_lib.load_checkpoint(args.resume, args.unsafe_full_unpickle)
    return None


# flags that set a model's parameter shapes: the ones to name when a checkpoint's weights do not fit
SHAPE_FLAGS = ("model", "input_size", "in_chans", "nb_classes", "global_pool")


def load_model_state(model: torch.nn.Module, ckpt: dict, path: str, args) -> None:
    """The checkpoint's weights, strictly; a checkpoint of another model is a SetupError naming the flags that differ
    from the ones it was written with, and the fix."""
    try:
        model.load_state_dict(ckpt["model"])
    except RuntimeError as e:
        detail = "; ".join(line.strip() for line in str(e).splitlines()[1:4])
        differ = [f"--{k} {old} there, {new} here" for k, old, new in changed_flags(args, ckpt, SHAPE_FLAGS)]
        raise SetupError(f"{path} holds a model that this run's flags do not build "
                         f"({'; '.join(differ) or 'no shape flag differs'}: {detail[:300]} ...). Give this run its "
                         "own --output_dir, or pass the flags that wrote the checkpoint.") from e


def resume(run: Run, state: TrainState, found: tuple[str, dict] | None) -> dict | None:
    """Restore the run from `found` (resume_source: path, checkpoint); returns the checkpoint."""
    if found is None:
        return None
    path, ckpt = found
    if "model" not in ckpt:
        raise SetupError(f"{path} holds no 'model' weights (keys: {sorted(ckpt)[:8]}); it is not a checkpoint of "
                         "this project or the reference")
    if ckpt.get("task") != run.task.name:
        # pre-training's --init_from takes any task's weights; the downstream tasks' --finetune takes pre-training's
        takes_weights = run.task.weights_flag and (ckpt.get("task") is None or run.task.name is None)
        hints = ["give this run its own --output_dir" if inside(path, run.args.output_dir)
                 else "--resume continues a run of this script",
                 f"to start from its weights, pass it as {run.task.weights_flag}" if takes_weights else ""]
        hint = "; ".join(h for h in hints if h)
        raise SetupError(f"{path} is a checkpoint of {ckpt.get('task') or 'pre-training'}, and this script runs "
                         f"{run.task.name or 'pre-training'}; {hint}")
    load_model_state(run.model_without_ddp, ckpt, path, run.args)
    if run.task.evaluation_only(run.args):
        logger.info("scoring %s (epoch %s)", path, ckpt.get("epoch"))
        return ckpt
    if "optimizer" in ckpt and "epoch" in ckpt:
        run.task.load_optimizer_state(run, ckpt["optimizer"], path)
        run.scaler.load_state_dict(ckpt.get("scaler") or {})
        state.restore(ckpt)
        rng = ckpt.get("rng")
        if rng and ckpt.get("world_size") == run.info.world_size:
            ckpt_lib.set_rng_state(rng[run.info.rank], run.device, run.info.local_rank)
        elif rng:
            logger.warning("checkpoint was written by %s processes, this run has %d: RNG streams restart from "
                           "the seed", ckpt.get("world_size"), run.info.world_size)
        run.run_log.recover_epoch_line(ckpt.get("epoch_log"))
    best = (f", best {run.task.selection.description or run.task.selection.metric} so far {state.best_score} "
            f"(epoch {state.best_epoch})" if run.task.selection else "")
    logger.info("resumed from %s: epoch %d, step %d%s", path, state.epoch, state.step, best)
    return ckpt


# ---- for tasks that select on validation and score a test set once ----------------------------------------------

def already_scored(args, found: tuple[str, dict] | None, results_name: str) -> bool:
    """True when output_dir's run is complete (its test results, results_name, are written): the same command then
    has nothing to do. Asked for more --epochs than the run trained, SetupError: the test set is scored once."""
    results = os.path.join(args.output_dir, results_name)
    if found is None or not os.path.isfile(results):
        return False
    _, ckpt = found
    epoch, _ = ckpt_lib.progress_of(ckpt)
    if epoch < args.epochs and not ckpt.get("stopped_early"):
        raise SetupError(f"this run finished after {epoch} epoch(s) and scored its test list ({results}); "
                         f"--epochs {args.epochs} would train on and score the test list again, and the test set "
                         "is scored once. Start a new run in another --output_dir (--finetune with the new "
                         "--epochs), or leave --epochs as it was.")
    logger.info("this run is complete and its test list was scored: %s (the test set is scored once; "
                "--eval --resume CHECKPOINT scores a checkpoint again, in another --output_dir)", results)
    return True


def changed_flags(args, ckpt: dict, flags: tuple[str, ...]) -> list[tuple[str, object, object]]:
    """(flag, the value the checkpoint's run had, this command's) for each of `flags` that differs; flags the
    checkpoint does not record (older files) are not compared."""
    saved = ckpt.get("args") or {}
    return [(k, saved[k], getattr(args, k)) for k in flags
            if k in saved and hasattr(args, k) and saved[k] != getattr(args, k)]


def check_eval_settings(args, path: str, ckpt: dict, settings: tuple[str, ...]) -> None:
    """--eval scores a checkpoint as its run scored: the flags in `settings` (what decides how the test images are
    prepared) must be the run's."""
    differ = [f"--{k} {old!r} in its run, {new!r} now" for k, old, new in changed_flags(args, ckpt, settings)]
    if differ:
        raise SetupError(f"--eval --resume {path}: {'; '.join(differ)}. Scoring with other transforms gives "
                         "another number for the same model: pass the run's own flags")


@torch.no_grad()
def predict_in_shares(run: Run, dataset, score_batch, what: str, dtype=np.float64) -> np.ndarray | None:
    """score_batch(batch) -> [B, V] numbers of every item of `dataset` (items end with their position), in dataset
    order on rank 0, None elsewhere. Each rank scores every world_size-th item (no padding, so no item counts twice)
    in eval mode, under the run's autocast, with progress lines; rank 0 gathers them all."""
    args, info = run.args, run.info
    mine = list(range(info.rank, len(dataset), info.world_size))
    loader = torch.utils.data.DataLoader(dataset, sampler=mine, batch_size=args.batch_size,
                                         num_workers=args.num_workers,
                                         pin_memory=args.pin_mem and run.device.type == "cuda")
    run.model_without_ddp.eval()
    values, positions = [], []
    for _, batch in MetricLogger().log_every(loader, args.print_freq, f"Scoring {what}:", len(loader)):
        with autocast(run.precision, run.device):
            values.append(torch.as_tensor(score_batch(batch)).double().cpu())
        positions.append(batch[-1])
    part = ((torch.cat(positions).numpy(), torch.cat(values).numpy()) if positions
            else (np.zeros(0, dtype=np.int64), None))
    parts = [part]
    if info.distributed:
        parts = [None] * info.world_size
        torch.distributed.all_gather_object(parts, part)
    if not info.is_main:
        return None
    width = next(v.shape[1] for _, v in parts if v is not None)
    out = np.full((len(dataset), width), np.nan, dtype=dtype)
    for rows, part_values in parts:
        if part_values is not None:
            out[rows] = part_values
    if np.isnan(out).any():
        raise RuntimeError(f"{what}: {int(np.isnan(out).any(axis=1).sum())} images got no score")
    return out


def log_load_report(source: str, report: dict, kinds=("adapted", "missing", "ignored")) -> None:
    """The counts of a load_pretrained report, then the keys of each of `kinds`."""
    logger.info("%s: loaded %d tensors, adapted %d, missing %d (kept their initialisation), ignored %d", source,
                len(report["loaded"]), len(report["adapted"]), len(report["missing"]), len(report["ignored"]))
    for kind in kinds:
        if report[kind]:
            logger.info("  %s: %s", kind, ", ".join(report[kind]))


# ---- the loop ---------------------------------------------------------------------------------------------------

def train_one_epoch(run: Run, state: TrainState) -> dict:
    """MAE's loop: the LR set every iteration, gradients accumulated over --accum_iter, DDP's all-reduce only on the
    iteration that steps, the loss averaged over processes. Returns the epoch's averages and throughput."""
    args, task = run.args, run.task
    task.set_train_mode(run)
    run.optimizer.zero_grad(set_to_none=True)
    metric_logger = MetricLogger()
    metric_logger.meters["lr"].fmt = "{value:.3e}"
    accum_iter, steps = args.accum_iter, run.steps_per_epoch
    loss_accum = torch.zeros((), device=run.device)
    start_time, images = time.time(), 0
    batches = metric_logger.log_every(run.loader, args.print_freq, f"Epoch: [{state.epoch}]", total=steps,
                                      start=state.step)
    # the next batch is copied (and --gpu_augment'ed) one step ahead, on a side stream on CUDA
    within = itertools.takewhile(lambda step_batch: step_batch[0] < steps, batches)  # none prepared past the end
    moved = on_device(within, lambda batch, step: task.to_device(run, state, batch, step), run.device)
    for data_iter_step, batch in moved:
        if data_iter_step % accum_iter == 0:
            lr = adjust_learning_rate(run.optimizer, data_iter_step / steps + state.epoch, args)
        update = (data_iter_step + 1) % accum_iter == 0
        grad_sync = contextlib.nullcontext() if update or not run.info.distributed else run.model.no_sync()
        with grad_sync:
            with autocast(run.precision, run.device):
                loss = task.loss(run, batch)
            run.scaler.backward(loss / accum_iter)
        loss_accum += loss.detach().float()
        images += batch[0].shape[0]
        task.count(state, batch)
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
        stop_if_asked(run, state)
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


def stop_if_asked(run: Run, state: TrainState) -> None:
    """After an optimizer step: --max_bad_steps non-finite steps in a row, or a pre-emption signal on any rank, write
    checkpoint-last and stop."""
    args = run.args
    if state.bad_steps_in_a_row >= args.max_bad_steps:
        save(run, state, state.epoch, state.step)
        raise TooManyBadSteps(
            f"{state.bad_steps_in_a_row} non-finite steps in a row (--max_bad_steps {args.max_bad_steps}). "
            f"checkpoint-last.pth holds the last good weights. Remedies: --precision bf16 (or fp32) instead of "
            f"fp16, a lower --blr, or --clip_grad 1.0; then rerun the same command to resume.")
    if state.preemption_requested:
        save(run, state, state.epoch, state.step)
        raise Preempted(run.preemption.signal_name or "signal on another rank")


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


def select(run: Run, state: SelectionState, metrics: dict, epoch: int, last: bool) -> bool:
    """Update the best epoch from this epoch's metrics (if it scored); True when this epoch is the new best.
    Also decides --patience's early stop."""
    selection, args = run.task.selection, run.args
    value = metrics.get(selection.metric)
    improved = False
    if value is not None:
        state.val_history.append([epoch, value])
        improved = selection.improves(value, state.best_score)
        if improved:
            state.best_score, state.best_epoch, state.scores_since_best = value, epoch, 0
        else:
            state.scores_since_best += 1
    state.stopped_early = bool(args.patience) and state.scores_since_best >= args.patience and not last
    return improved


def run_epochs(run: Run, state: TrainState) -> None:
    args, task = run.args, run.task
    for epoch in range(state.epoch, args.epochs):
        if getattr(state, "stopped_early", False):
            break
        state.epoch = epoch
        run.sampler.set_epoch(epoch)
        run.sampler.set_start(state.step * args.batch_size)
        stats = train_one_epoch(run, state)
        state.step = 0
        last = epoch + 1 == args.epochs
        metrics = {k: v for k, v in task.evaluate(run, state, epoch, last).items() if v is not None}
        improved = select(run, state, metrics, epoch, last) if task.selection else False
        log_stats = {**{f"train_{k}": v for k, v in stats.items()}, **metrics, "epoch": epoch}
        if task.selection:
            log_stats[f"best_{task.selection.metric}"] = state.best_score
        save(run, state, epoch, 0, periodic=task.periodic_checkpoint(args, epoch, last), best=improved,
             epoch_log=log_stats)
        run.run_log.epoch_line(log_stats)
        if run.info.is_main:
            task.after_epoch(run, state)
        if getattr(state, "stopped_early", False):
            logger.info("early stop: %d evaluations without improvement (--patience %d); best epoch %d",
                        state.scores_since_best, args.patience, state.best_epoch)
            break


# ---- the whole run ----------------------------------------------------------------------------------------------

def run(task: Task, args) -> int:
    """Check every flag, then run the task on this process's share; returns the process exit code."""
    validate_args(args, task.check_args(args))
    return run_reporting_failures(args, lambda info, device: _run(task, args, info, device))


def _run(task: Task, args, info, device) -> int:
    try:
        check_outputs_writable(args, info)
        identity = run_identity(task, args)
        found = resume_source(task, args, identity)  # compared with output_dir's run before anything is written
    except (OSError, ValueError) as e:  # a missing, damaged or unreadable checkpoint
        raise SetupError(f"--resume/--auto_resume: {e}") from e
    if not task.check_before_writing(args, found):
        return ExitCode.OK
    try:
        built = build_run(task, args, info, device, identity)
    except SETUP_ERRORS as e:  # missing or bad data, bad lists
        raise SetupError(str(e)) from e
    state = task.state_class(epoch=args.start_epoch)
    try:
        resumed = resume(built, state, found)
    except (OSError, ValueError) as e:  # a checkpoint of another model
        raise SetupError(f"--resume/--auto_resume: {e}") from e
    if resumed is None and not task.evaluation_only(args):
        task.initialise(built, state)
    if info.is_main:
        write_json(os.path.join(args.output_dir, "args.json"), vars(args))
    logger.info("model: %s, %.1fM parameters; start at epoch %d step %d", args.model,
                sum(p.numel() for p in built.model_without_ddp.parameters()) / 1e6, state.epoch, state.step)
    if not task.before_epochs(built, state, resumed):
        return ExitCode.OK
    start = time.time()
    run_epochs(built, state)
    built.run_log.close()
    logger.info("training time %s", datetime.timedelta(seconds=int(time.time() - start)))
    task.finish(built, state)
    return ExitCode.OK


def run_reporting_failures(args, body) -> int:
    """Distributed set-up, then body(info, device) -> exit code. Pre-emption, bad input, a failed write, a bad image
    and a dead peer each end in a one-line report and their exit code (PRETRAIN.md section 6), on every rank. Any
    other exception is a bug: its traceback is logged on the failing rank, then the one-line summary."""
    try:
        info, device = dist_lib.init_distributed(args)
    except SetupError as e:  # a half-set launcher environment, --device cuda without CUDA
        setup_logging(None, 0)
        logger.error("error: %s", e)
        return ExitCode.FAILED
    setup_logging(None, info.rank)  # console only until output_dir has passed its write probe
    logger.info("%s", dist_lib.describe(info))
    if info.is_main and (problem := dist_lib.elastic_restart_problem()):
        logger.warning("%s", problem)
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
    except (SetupError, ckpt_lib.CheckpointWriteError) as e:
        logger.error("error: %s", e)
        return ExitCode.FAILED
    except BadImageError as e:
        logger.error("error: %s (checkpoint-last.pth, if any, is intact; rerun to resume)", e)
        return ExitCode.FAILED
    except Exception as e:  # noqa: BLE001 - a lost peer is reported in one line; anything else is a bug
        if info.distributed and dist_lib.is_communication_failure(e):
            logger.error("rank %d: a collective failed (%s). %s. Each rank's log is in output_dir/logs/ "
                         "(rank 0) or on its console.", info.rank, str(e).splitlines()[0], dist_lib.peer_report())
            return ExitCode.FAILED
        logger.exception("rank %d: unexpected %s (a bug; please report it with the traceback above)",
                         info.rank, type(e).__name__)
        logger.error("error: unexpected %s: %s", type(e).__name__, str(e).splitlines()[0] if str(e) else "")
        return ExitCode.FAILED
    finally:
        dist_lib.cleanup()
