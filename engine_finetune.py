"""Fine-tuning and linear probing on labelled chest X-rays, shared by main_finetune_chestxray.py and
main_linprobe_chestxray.py.

run_finetuning reads top to bottom: checks -> splits (every file present, no patient in two splits; the test
labels are not read) -> model and pre-trained weights (a report of every key) -> optimizer -> resume -> epochs.
Each epoch trains, then every --eval_interval epochs scores the validation list; the best mean validation AUROC is
kept as checkpoint-best.pth. After the last epoch (or --patience scores without improvement) the test list is read
and scored once, with checkpoint-best.pth: results.json, a table in the log, ROC curves, and the validation AUROC
curve. Every AUROC is computed on predictions gathered from all ranks, so it equals the single-process value.
"""
import contextlib
import datetime
import logging
import os
import pickle
import sys
import time
from dataclasses import dataclass, field

import numpy as np
import pandas as pd
import torch
from timm.data import Mixup
from timm.data.mixup import mixup_target
from timm.optim import create_optimizer_v2
from torch.nn.parallel import DistributedDataParallel

from data import labelled
from data.sampler import ResumableSampler
from engine_pretrain import (
    SetupError,
    TrainState,
    gather_rng,
    log_load_report,
    optimizer_step,
    resume_source,
    run_reporting_failures,
    seed_everything,
    stop_if_asked,
    train_loader,
    write_checkpoint,
)
from util import checkpoint as ckpt_lib
from util import dist as dist_lib
from util.args import ExitCode, resolve_lr, validate_finetune_args
from util.log import MetricLogger, RunLog, git_commit, setup_logging, write_json
from util.lr_sched import adjust_learning_rate
from util.metrics import bootstrap_auroc, mean_auroc, per_finding_auroc
from util.model_api import Classifier
from util.precision import LossScaler, autocast, configure_backends, resolve_precision
from util.preemption import PreemptionFlag
from util.vis import save_loss_curve, save_roc_curves

logger = logging.getLogger(__name__)

BEST_NAME = "checkpoint-best.pth"


@dataclass
class FinetuneState(TrainState):
    best_auroc: float | None = None  # mean validation AUROC of checkpoint-best.pth
    best_epoch: int | None = None
    val_history: list = field(default_factory=list)  # [epoch, mean validation AUROC] per score
    scores_since_best: int = 0
    stopped_early: bool = False  # --patience ended the run before --epochs
    pretrained_keys: dict | None = None  # --finetune's load report, for results.json


@dataclass(frozen=True)
class FinetuneRun:
    """What run_finetuning builds once; the names engine_pretrain.optimizer_step reads are the same."""

    args: object
    task: str  # finetune | linprobe
    info: dist_lib.DistInfo
    device: torch.device
    precision: str
    classifier: Classifier
    model: torch.nn.Module  # DDP-wrapped when distributed
    model_without_ddp: torch.nn.Module
    optimizer: torch.optim.Optimizer
    scaler: LossScaler
    splits: dict
    loader: torch.utils.data.DataLoader
    sampler: ResumableSampler
    steps_per_epoch: int
    mixup: Mixup | None
    run_log: RunLog
    preemption: PreemptionFlag
    findings: list = field(default_factory=list)


def build_optimizer(args, classifier: Classifier, linear_probe: bool) -> torch.optim.Optimizer:
    """MAE's choices through timm: LARS on the head for a linear probe; AdamW with no decay on biases, norms and
    position embeddings, and for ViTs layer-wise LR decay (each group's lr_scale), for fine-tuning."""
    model = classifier.model
    if linear_probe:
        trainable = [p for p in model.parameters() if p.requires_grad]
        return create_optimizer_v2(trainable, "lars", lr=args.lr, weight_decay=args.weight_decay, momentum=0.9)
    layer_decay = args.layer_decay if classifier.layer_decay else None
    return create_optimizer_v2(model, "adamw", lr=args.lr, weight_decay=args.weight_decay, layer_decay=layer_decay)


def build_mixup(args, num_classes: int) -> Mixup | None:
    if not (args.mixup > 0 or args.cutmix > 0 or args.cutmix_minmax):
        return None
    return Mixup(mixup_alpha=args.mixup, cutmix_alpha=args.cutmix, cutmix_minmax=args.cutmix_minmax,
                 prob=args.mixup_prob, switch_prob=args.mixup_switch_prob, mode=args.mixup_mode,
                 label_smoothing=args.smoothing, num_classes=num_classes, multi_label=True)


def shared_splits(args, info, device) -> dict:
    """Rank 0 reads the lists and checks every file; the other ranks receive its splits and touch no file (8 ranks x
    N nodes would otherwise stat the whole dataset at every start and requeue)."""
    built = None

    def build() -> bytes:
        nonlocal built
        built = labelled.build_splits(args)
        return pickle.dumps(built) if info.distributed else b""

    payload = dist_lib.share_from_main(info, device, build)
    return built if info.is_main else pickle.loads(payload)


def load_pretrained(args, classifier: Classifier) -> dict | None:
    """--finetune: fill the encoder, logging every key loaded, adapted, missing (kept at initialisation) and
    ignored. The lists also go to results.json."""
    if not args.finetune:
        logger.info("no --finetune checkpoint: the model starts from random initialisation")
        return None
    report = classifier.load_pretrained(ckpt_lib.load_checkpoint(args.finetune))
    log_load_report(f"--finetune {args.finetune} ({args.checkpoint_type or 'format found from its keys'})", report,
                    kinds=("loaded", "adapted", "missing", "ignored"))
    return report


def train_one_epoch(run: FinetuneRun, state: FinetuneState) -> dict:
    args, model = run.args, run.model
    model.train()
    if run.task == "linprobe":  # frozen backbone: its BatchNorm statistics and dropout stay as pre-trained
        run.model_without_ddp.eval()
        run.classifier.head.train()
    run.optimizer.zero_grad(set_to_none=True)
    metric_logger = MetricLogger()
    metric_logger.meters["lr"].fmt = "{value:.3e}"
    criterion = torch.nn.BCEWithLogitsLoss()
    steps, accum_iter = run.steps_per_epoch, args.accum_iter
    loss_accum = torch.zeros((), device=run.device)
    batches = metric_logger.log_every(run.loader, args.print_freq, f"Epoch: [{state.epoch}]", total=steps,
                                      start=state.step)
    for data_iter_step, (images, targets, _) in batches:
        if data_iter_step >= steps:
            break
        if data_iter_step % accum_iter == 0:
            lr = adjust_learning_rate(run.optimizer, data_iter_step / steps + state.epoch, args)
        images = images.to(run.device, non_blocking=True)
        targets = targets.to(run.device, non_blocking=True)
        if run.mixup is not None:
            images, targets = run.mixup(images, targets)
        elif args.smoothing:
            targets = mixup_target(targets, targets.shape[1], 1.0, args.smoothing, multi_label=True)
        update = (data_iter_step + 1) % accum_iter == 0
        with model.no_sync() if run.info.distributed and not update else contextlib.nullcontext():
            with autocast(run.precision, run.device):
                loss = criterion(model(images).float(), targets)
            run.scaler.backward(loss / accum_iter)
        loss_accum += loss.detach()
        if not update:
            continue
        loss_value, grad_norm, stepped = optimizer_step(run, state, loss_accum / accum_iter)
        loss_accum.zero_()
        state.step = data_iter_step + 1
        if stepped:
            metric_logger.update(loss=loss_value, lr=lr, grad_norm=grad_norm)
            run.run_log.scalar("train_loss", loss_value, int((data_iter_step / steps + state.epoch) * 1000))
        stop_if_asked(run, state, lambda: save(run, state, state.epoch, state.step))
    return {k: meter.global_avg for k, meter in metric_logger.meters.items()}


@torch.no_grad()
def predict(run: FinetuneRun, split: labelled.Split) -> np.ndarray | None:
    """Sigmoid scores [N, K] of a split in list order on rank 0 (None elsewhere). Each rank scores every
    world_size-th image (no padding, so no image counts twice) and rank 0 gathers them all."""
    args, info = run.args, run.info
    dataset = labelled.LabelledDataset(split, labelled.build_transform(args, is_train=False), args.dataset)
    mine = list(range(info.rank, len(dataset), info.world_size))
    loader = torch.utils.data.DataLoader(dataset, sampler=mine, batch_size=args.batch_size,
                                         num_workers=args.num_workers, pin_memory=args.pin_mem and
                                         run.device.type == "cuda")
    model = run.model_without_ddp
    model.eval()
    scores, positions = [], []
    metric_logger = MetricLogger()
    total = len(loader)
    for _, (images, _, index) in metric_logger.log_every(loader, args.print_freq, f"Scoring {split.role}:", total):
        with autocast(run.precision, run.device):
            logits = model(images.to(run.device, non_blocking=True))
        scores.append(torch.sigmoid(logits.float()).cpu())
        positions.append(index)
    part = (torch.cat(positions).numpy(), torch.cat(scores).numpy())
    parts = [part]
    if info.distributed:
        parts = [None] * info.world_size
        torch.distributed.all_gather_object(parts, part)
    if not info.is_main:
        return None
    out = np.full((len(dataset), len(run.findings)), np.nan, dtype=np.float32)
    for rows, values in parts:
        out[rows] = values
    if np.isnan(out).any():
        raise RuntimeError(f"{split.role}: {int(np.isnan(out).any(axis=1).sum())} images got no score")
    return out


def validate(run: FinetuneRun, epoch: int) -> float | None:
    """Mean AUROC over findings on the validation list, the same value on every rank."""
    val = run.splits["val"]
    scores = predict(run, val)
    value = torch.zeros(2, device=run.device)
    if run.info.is_main:
        aurocs = per_finding_auroc(scores, val.labels)
        mean = mean_auroc(aurocs)
        if mean is not None:
            value[:] = torch.tensor([mean, 1.0])
            logger.info("epoch %d: validation mean AUROC %.4f (%s)", epoch, mean, ", ".join(
                f"{name} {a:.3f}" for name, a in zip(run.findings, aurocs) if a is not None))
            for name, a in zip(run.findings, aurocs):
                if a is not None:
                    run.run_log.scalar(f"val_auroc/{name}", a, (epoch + 1) * 1000)
        else:
            logger.warning("epoch %d: no finding has both classes in the validation list; nothing to select by",
                           epoch)
    dist_lib.all_reduce(value)
    return float(value[0]) if value[1] > 0 else None


def save(run: FinetuneRun, state: FinetuneState, epoch: int, step: int, best: bool = False,
         epoch_log: dict | None = None) -> None:
    """checkpoint-last.pth (and a copy as checkpoint-best.pth); rank 0 writes, every rank joins. An end-of-epoch
    checkpoint carries the epoch's log.txt line (epoch_log), which resume restores if log.txt lacks it."""
    rng = gather_rng(run, epoch, step)
    ckpt = None
    if run.info.is_main:
        ckpt = ckpt_lib.assemble(
            run.model_without_ddp, run.optimizer, run.scaler.state_dict(), run.args, epoch, step, rng=rng,
            world_size=run.info.world_size, task=run.task, findings=run.findings,
            optimizer_steps=state.optimizer_steps, bad_steps_total=state.bad_steps_total,
            scaler_skips_total=state.scaler_skips_total, best_auroc=state.best_auroc, best_epoch=state.best_epoch,
            val_history=state.val_history, scores_since_best=state.scores_since_best,
            stopped_early=state.stopped_early,
            pretrained_keys=state.pretrained_keys, epoch_log=epoch_log)
    write_checkpoint(run, ckpt, BEST_NAME if best else None)


def resume(run: FinetuneRun, state: FinetuneState) -> dict | None:
    """--resume, or with --auto_resume checkpoint-last.pth of output_dir; returns the checkpoint."""
    args = run.args
    found = resume_source(args)
    if found is None:
        return None
    path, ckpt = found
    if ckpt.get("task") != run.task:
        raise ValueError(f"{path} is not a checkpoint of this script (task {ckpt.get('task', 'pre-training')!r}, "
                         f"expected {run.task!r}); give this run its own --output_dir")
    run.model_without_ddp.load_state_dict(ckpt["model"])
    if args.eval:
        logger.info("--eval: scoring %s (epoch %s)", path, ckpt.get("epoch"))
        return ckpt
    run.optimizer.load_state_dict(ckpt["optimizer"])
    run.scaler.load_state_dict(ckpt.get("scaler") or {})
    state.epoch, state.step = ckpt_lib.progress_of(ckpt)
    for name in ("optimizer_steps", "bad_steps_total", "scaler_skips_total", "best_auroc", "best_epoch",
                 "val_history", "scores_since_best", "stopped_early", "pretrained_keys"):
        if name in ckpt:
            setattr(state, name, ckpt[name])
    rng = ckpt.get("rng")
    if rng and ckpt.get("world_size") == run.info.world_size:
        ckpt_lib.set_rng_state(rng[run.info.rank], run.device, run.info.local_rank)
    run.run_log.recover_epoch_line(ckpt.get("epoch_log"))
    logger.info("resumed from %s: epoch %d, step %d, best validation AUROC so far %s (epoch %s)", path,
                state.epoch, state.step, state.best_auroc, state.best_epoch)
    return ckpt


def run_epochs(run: FinetuneRun, state: FinetuneState) -> None:
    args = run.args
    for epoch in range(state.epoch, args.epochs):
        if state.stopped_early:
            break
        state.epoch = epoch
        run.sampler.set_epoch(epoch)
        run.sampler.set_start(state.step * args.batch_size)
        stats = train_one_epoch(run, state)
        state.step = 0
        last = epoch + 1 == args.epochs
        improved = False
        if epoch % args.eval_interval == 0 or last:
            value = validate(run, epoch)
            if value is not None:
                state.val_history.append([epoch, value])
                improved = state.best_auroc is None or value > state.best_auroc
                if improved:
                    state.best_auroc, state.best_epoch, state.scores_since_best = value, epoch, 0
                else:
                    state.scores_since_best += 1
                stats["val_auroc"] = value
                run.run_log.scalar("val_auroc", value, (epoch + 1) * 1000)
        state.stopped_early = bool(args.patience) and state.scores_since_best >= args.patience and not last
        log_stats = {**{f"train_{k}": v for k, v in stats.items() if k != "val_auroc"},
                     **({"val_auroc": stats["val_auroc"]} if "val_auroc" in stats else {}),
                     "best_val_auroc": state.best_auroc, "epoch": epoch}
        save(run, state, epoch, 0, best=improved, epoch_log=log_stats)
        run.run_log.epoch_line(log_stats)
        if run.info.is_main:
            save_loss_curve(os.path.join(args.output_dir, "log.txt"), os.path.join(args.output_dir, "val_auroc.png"),
                            keys=("val_auroc",), ylabel="mean validation AUROC")
        if state.stopped_early:
            logger.info("early stop: %d validation scores without improvement (--patience %d); best epoch %d",
                        state.scores_since_best, args.patience, state.best_epoch)
            break


def score_test(run: FinetuneRun, state: FinetuneState, weights: str | None) -> None:
    """Read the test labels and images now, for the first time, and score them once with the `weights` checkpoint
    (None: the weights already loaded, --eval's --resume)."""
    args = run.args
    if weights is not None:
        run.model_without_ddp.load_state_dict(ckpt_lib.load_checkpoint(weights)["model"])
    weights = weights or args.resume
    test = labelled.load_labels(args, run.splits["test"])
    logger.info("scoring the test list %s once (%d images), with %s", test.source, len(test), weights)
    scores = predict(run, test)
    if not run.info.is_main:
        return
    aurocs = per_finding_auroc(scores, test.labels)
    mean = mean_auroc(aurocs)
    start = time.time()
    ci = bootstrap_auroc(scores, test.labels, test.patients, args.bootstrap, seed=args.seed) if args.bootstrap else None
    if ci:
        logger.info("bootstrap: %d patient resamples in %.1f s", args.bootstrap, time.time() - start)
    out = args.output_dir
    train = run.splits["train"]
    results = {
        "task": run.task, "model": args.model, "dataset": args.dataset, "findings": run.findings,
        "checkpoint": os.path.abspath(weights),
        "selected_epoch": state.best_epoch, "selected_by": "mean validation AUROC",
        "val_mean_auroc": state.best_auroc, "val_history": state.val_history, "val_list": run.splits["val"].source,
        "test": {
            "list": test.source, "images": len(test), "patients": int(len(np.unique(test.patients))),
            "mean_auroc": mean, "mean_auroc_ci95": ci["mean"] if ci else None,
            "per_finding": {name: {"auroc": a, "ci95": ci["per_finding"][k] if ci else None,
                                   "positives": int(test.labels[:, k].sum())}
                            for k, (name, a) in enumerate(zip(run.findings, aurocs))},
        },
        "bootstrap": {"resamples": args.bootstrap, "unit": "patient", "seed": args.seed, "level": 0.95},
        "label_fraction": args.label_fraction, "train_list": train.source, "train_images": len(train),
        "train_patients": int(len(np.unique(train.patients))), "input_size": args.input_size,
        "in_chans": args.in_chans, "pretrained": args.finetune or None,
        "pretrained_keys": state.pretrained_keys, "world_size": run.info.world_size, "git": git_commit(),
    }
    write_json(os.path.join(out, "results.json"), results)
    names = np.array([os.path.basename(p.decode()) for p in test.paths])
    table = {"image": names, "patient": [p.decode() for p in test.patients]}
    for k, name in enumerate(run.findings):
        table[f"{name} label"] = test.labels[:, k]
        table[f"{name} score"] = scores[:, k]
    pd.DataFrame(table).to_csv(os.path.join(out, "test_predictions.csv"), index=False)
    save_roc_curves(scores, test.labels, run.findings, aurocs, os.path.join(out, "roc"),
                    f"{args.model}, test, epoch {state.best_epoch}")
    logger.info("%s", results_table(results))
    logger.info("wrote %s, test_predictions.csv and roc/*.png", os.path.join(out, "results.json"))


def results_table(results: dict) -> str:
    test = results["test"]
    head = (f"test AUROC on {test['list']} ({test['images']} images, {test['patients']} patients), "
            f"{results['task']} {results['model']}, checkpoint of epoch {results['selected_epoch']} "
            f"(selected by mean validation AUROC {_fmt(results['val_mean_auroc'])})")
    width = max(len(n) for n in [*results["findings"], "mean"])
    ci_note = (f"95% CI from {results['bootstrap']['resamples']} patient resamples" if test["mean_auroc_ci95"]
               else "no bootstrap (--bootstrap 0)")
    lines = [head, f"  {'finding':<{width}}  AUROC   {ci_note}"]
    for name, row in test["per_finding"].items():
        lines.append(f"  {name:<{width}}  {_fmt(row['auroc'])}  {_fmt_ci(row['ci95'])}")
    lines.append(f"  {'mean':<{width}}  {_fmt(test['mean_auroc'])}  {_fmt_ci(test['mean_auroc_ci95'])}")
    return "\n".join(lines)


def _fmt(value) -> str:
    return "  n/a " if value is None else f"{value:.4f}"


def _fmt_ci(ci) -> str:
    return "" if not ci else f"[{ci[0]:.4f}, {ci[1]:.4f}]"


def run_finetuning(args, build_classifier, task: str, check_model_args=None) -> int:
    """Entry point shared by both scripts; returns the process exit code."""
    return run_reporting_failures(args, lambda info, device: _run(args, info, device, build_classifier, task,
                                                                   check_model_args))


def _run(args, info, device, build_classifier, task, check_model_args) -> int:
    validate_finetune_args(args, labelled.check_data_args(args) + (check_model_args(args) if check_model_args else []))
    if args.eval and os.path.isfile(os.path.join(args.output_dir, "results.json")):
        raise SetupError(f"--eval: {args.output_dir} already holds results.json; give the evaluation its own "
                         "--output_dir, so no result is overwritten")
    try:
        if info.is_main:
            ckpt_lib.check_writable(args.output_dir)
            ckpt_lib.remove_stale_temp_files(args.output_dir)
        setup_logging(args.output_dir if info.is_main else None, info.rank)
        splits = shared_splits(args, info, device)
        splits["train"] = labelled.label_fraction(splits["train"], args.label_fraction, args.fraction_seed,
                                                  args.output_dir, write=info.is_main)
        train_set = labelled.LabelledDataset(splits["train"], labelled.build_transform(args, is_train=True),
                                             args.dataset)
        loader, sampler, steps = train_loader(args, train_set, info, device, what="the training list")
    except (OSError, ValueError, dist_lib.MainRankError) as e:  # missing data, bad lists, shared patients, ...
        raise SetupError(str(e)) from e
    for split in splits.values():
        logger.info("%s list %s: %d images, %d patients", split.role, split.source, len(split),
                    len(np.unique(split.patients)))
    seed_everything(args.seed + info.rank)
    precision = resolve_precision(args.precision, device)
    configure_backends(device, args.deterministic)
    eff_batch_size = resolve_lr(args, info.world_size)
    logger.info("%s %s: base lr %.2e, actual lr %.2e, effective batch %d, %d steps per epoch, precision %s", task,
                args.model, args.lr * 256 / eff_batch_size, args.lr, eff_batch_size, steps // args.accum_iter,
                precision)
    classifier = build_classifier(args)
    try:
        pretrained_report = None if args.eval else load_pretrained(args, classifier)
    except (OSError, ValueError, RuntimeError, KeyError) as e:
        raise SetupError(f"--finetune: {e}") from e
    model = classifier.model.to(device)
    model_without_ddp = model
    optimizer = build_optimizer(args, classifier, task == "linprobe")
    if args.compile:
        model = torch.compile(model)
    if info.distributed:
        model = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
        dist_lib.Heartbeat(info, args.dist_timeout, args.heartbeat_timeout, ExitCode.FAILED)
    run = FinetuneRun(args=args, task=task, info=info, device=device, precision=precision, classifier=classifier,
                      model=model, model_without_ddp=model_without_ddp, optimizer=optimizer,
                      scaler=LossScaler(precision, device), splits=splits, loader=loader, sampler=sampler,
                      steps_per_epoch=steps, mixup=build_mixup(args, args.nb_classes),
                      run_log=RunLog(args.output_dir, args.log_dir, info.is_main),
                      preemption=PreemptionFlag().install(),
                      findings=labelled.findings(args.dataset))
    state = FinetuneState(epoch=args.start_epoch, pretrained_keys=pretrained_report)
    try:
        resumed = resume(run, state)
    except (OSError, ValueError, RuntimeError, KeyError) as e:
        raise SetupError(f"--resume/--auto_resume: {e}") from e
    if info.is_main:
        write_json(os.path.join(args.output_dir, "args.json"), vars(args))
    if args.eval:
        state.best_epoch = resumed.get("best_epoch", resumed.get("epoch"))
        state.best_auroc, state.val_history = resumed.get("best_auroc"), resumed.get("val_history", [])
        state.pretrained_keys = resumed.get("pretrained_keys")
        score_test(run, state, None)
        return ExitCode.OK
    results = os.path.join(args.output_dir, "results.json")
    if (state.epoch >= args.epochs or state.stopped_early) and os.path.isfile(results):
        logger.info("this run is complete and its test list was scored: %s (the test set is scored once; "
                    "--eval --resume CHECKPOINT scores a checkpoint again, in another --output_dir)", results)
        return ExitCode.OK
    start = time.time()
    run_epochs(run, state)
    run.run_log.close()
    logger.info("training time %s", datetime.timedelta(seconds=int(time.time() - start)))
    if state.best_epoch is None:
        raise SetupError("no validation score selected a checkpoint: no finding has both classes in the "
                         f"validation list {splits['val'].source}")
    score_test(run, state, os.path.join(args.output_dir, BEST_NAME))
    return ExitCode.OK


def cli_main(parser, model_names, build_classifier, task: str, check_model_args=None) -> None:
    """Parse, answer --model list, and run: the whole body of each entry script."""
    args = parser.parse_args()
    if args.model == "list":
        print("\n".join(model_names))
        sys.exit(ExitCode.OK)
    sys.exit(run_finetuning(args, build_classifier, task, check_model_args))

