"""The multi-label classification task, run by engine.py: fine-tuning and linear probing are two settings of it.

What it adds to the shared run: the labelled splits (rank 0 reads the lists and checks every file and that no patient
is in two splits; the test labels are not read), the pre-trained weights (--finetune, with a report of every key),
BCE on the logits (with timm's mixup, cutmix and label smoothing), and the evaluation protocol. Every --eval_interval
epochs the validation list is scored; the best mean validation AUROC is kept as checkpoint-best.pth. After the last
epoch (or --patience scores without improvement) the test list is read and scored once, with checkpoint-best.pth:
results.json, a table in the log, ROC curves, and the validation AUROC curve. Every AUROC is computed on predictions
gathered from all ranks, so it equals the single-process value.
"""
import json
import logging
import os
import pickle
import time
from dataclasses import dataclass, replace

import numpy as np
import pandas as pd
import torch
from timm.data import Mixup
from timm.data.mixup import mixup_target
from timm.optim import create_optimizer_v2

from data import covidx, labelled
from engine import (
    ScoredOnceTask,
    Selection,
    SelectionState,
    TaskData,
    checkpointed,
    file_fingerprint,
    log_load_report,
    predict_in_shares,
)
from util import checkpoint as ckpt_lib
from util import dist as dist_lib
from util import predictions
from util.errors import SetupError
from util.lars import Lars
from util.log import git_commit, write_json
from util.metrics import bootstrap_auroc, bootstrap_single_label, mean_auroc, per_finding_auroc, single_label_metrics
from util.model_api import Classifier
from util.vis import roc_path, save_confusion_matrix, save_loss_curve, save_roc_curves

logger = logging.getLogger(__name__)

TASKS = ("finetune", "linprobe")
RESULTS_NAME = "results.json"  # written last: its presence means the run is complete and its test list scored
PREDICTIONS_NAME = "test_predictions.csv"
EXCLUDED_PREDICTIONS_NAME = "test_predictions_excluded.csv"  # --exclude_list --exclude_mode separate
VAL_PREDICTIONS_NAME = "val_predictions.csv"  # the selected weights on the validation list: operating points
CONFUSION_NAME = "confusion_matrix.png"
CSV_COLUMNS = ("path_column", "label_columns", "label_column", "classes", "patient_column")  # --dataset csv
# what decides how a checkpoint's test images are prepared: --eval must score with its run's values
EVAL_SETTINGS = ("dataset", "input_size", "in_chans", "norm_stats", "build_timm_transform", "global_pool")


@dataclass
class ClassificationState(SelectionState):
    pretrained_keys: dict | None = checkpointed(None)  # --finetune's load report, for results.json


def build_optimizer(args, classifier: Classifier, linear_probe: bool) -> torch.optim.Optimizer:
    """MAE's choices: its LARS on the head for a linear probe (util/lars.py: timm's Lars applies the rule
    differently); through timm, AdamW with no decay on biases, norms and position embeddings, and for ViTs layer-wise
    LR decay (each group's lr_scale), for fine-tuning."""
    model = classifier.model
    if linear_probe:
        trainable = [p for p in model.parameters() if p.requires_grad]
        return Lars(trainable, lr=args.lr, weight_decay=args.weight_decay)
    layer_decay = args.layer_decay if classifier.layer_decay else None
    return create_optimizer_v2(model, "adamw", lr=args.lr, weight_decay=args.weight_decay, layer_decay=layer_decay)


def build_mixup(args, num_classes: int, multi_label: bool = True) -> Mixup | None:
    if not (args.mixup > 0 or args.cutmix > 0 or args.cutmix_minmax):
        return None
    return Mixup(mixup_alpha=args.mixup, cutmix_alpha=args.cutmix, cutmix_minmax=args.cutmix_minmax,
                 prob=args.mixup_prob, switch_prob=args.mixup_switch_prob, mode=args.mixup_mode,
                 label_smoothing=args.smoothing, num_classes=num_classes, multi_label=multi_label)


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


def reference_flag_problems(args, linear_probe: bool) -> list[str]:
    """The reference's --optimizer, --loss_func, --aug_strategy, --src, --resplit, --repeated-aug and --ThreeAugment:
    accepted at what this project does, refused otherwise with what to use instead."""
    problems = []
    if args.repeated_aug or args.ThreeAugment:
        problems.append("--repeated-aug and --ThreeAugment are the reference's flags for DeiT-style training and are "
                        "not supported in fine-tuning here; drop them (its published commands do not use them)")
    optimizer = "lars" if linear_probe else "adamw"
    if args.optimizer is not None and args.optimizer.lower() != optimizer:
        problems.append(f"--optimizer {args.optimizer}: this script trains with {optimizer} (MAE's "
                        f"{'probe' if linear_probe else 'fine-tuning'} recipe, as the reference's commands); "
                        f"drop the flag or pass --optimizer {optimizer}")
    loss = "ce" if labelled.is_single_label(args) else "bce"  # the task's loss
    if args.loss_func is not None and args.loss_func.lower() != loss:
        problems.append(f"--loss_func {args.loss_func}: the loss follows the task here, {loss} for this one (BCE with "
                        "logits for multi-label lists and one-logit NODE21, cross-entropy for single-label ones such "
                        f"as COVIDx and two-logit NODE21: --nb_classes 2); drop the flag or pass --loss_func {loss}")
    if args.aug_strategy != "default":
        problems.append(f"--aug_strategy {args.aug_strategy}: only 'default' is supported; set the augmentation "
                        "with --build_timm_transform, --aa, --reprob, --mixup and --cutmix")
    if args.src:
        problems.append("--src is a reference flag that is not supported here; drop it (its published commands do "
                        "not use it)")
    if args.resplit:
        problems.append("--resplit is not supported: the splits are the lists you give (--train_list/--val_list/"
                        "--test_list) and --label_fraction draws a share of the training patients")
    return problems


def check_args(args) -> list[str]:
    """The classification flags beyond the common ones (util.args.validate_args)."""
    problems = labelled.check_data_args(args)
    for flag in ("eval_interval", "nb_classes"):
        if getattr(args, flag) < 1:
            problems.append(f"--{flag} must be >= 1, got {getattr(args, flag)}")
    for flag in ("patience", "bootstrap"):
        if getattr(args, flag) < 0:
            problems.append(f"--{flag} must be >= 0, got {getattr(args, flag)}")
    if not 0.0 < args.label_fraction <= 1.0:
        problems.append(f"--label_fraction is a share of the training list in (0, 1], got {args.label_fraction}")
    if hasattr(args, "layer_decay") and not 0.0 < args.layer_decay <= 1.0:
        problems.append(f"--layer_decay must be in (0, 1], got {args.layer_decay:g}: 0 would freeze every layer but "
                        "the head, 1 is no decay")
    if not 0.0 <= args.drop_path < 1.0:
        problems.append(f"--drop_path must be in [0, 1), got {args.drop_path}")
    if not 0.0 <= args.smoothing < 1.0:
        problems.append(f"--smoothing must be in [0, 1), got {args.smoothing}")
    if (args.mixup > 0 or args.cutmix > 0 or args.cutmix_minmax) and args.batch_size % 2:
        problems.append(f"--mixup/--cutmix pair each image with another of its batch: --batch_size must be even, "
                        f"got {args.batch_size}")
    if args.eval and not args.resume:
        problems.append("--eval scores a fine-tuned model: pass --resume with a checkpoint of this script")
    return problems


class ClassificationTask(ScoredOnceTask):
    """Multi-label classification of chest X-ray findings; `build_classifier(args)` makes a util.model_api.Classifier.
    name is "finetune" or "linprobe" (a linear probe trains the head alone, with LARS, on a frozen encoder)."""

    state_class = ClassificationState
    results_name = RESULTS_NAME
    eval_settings = EVAL_SETTINGS
    multi_label = True
    weights_flag = "--finetune"
    selection = Selection("val_auroc", higher_is_better=True, description="mean validation AUROC")

    def __init__(self, build_classifier, name: str = "finetune", check_model_args=None):
        if name not in TASKS:
            raise ValueError(f"classification task {name!r}: one of {TASKS}")
        self.name = name
        self.build_classifier = build_classifier
        self.check_model_args = check_model_args
        self.classifier: Classifier | None = None
        self.splits: dict = {}
        self.findings: list[str] = []

    @property
    def linear_probe(self) -> bool:
        return self.name == "linprobe"

    def check_args(self, args) -> list[str]:
        return (check_args(args) + reference_flag_problems(args, self.linear_probe)
                + (self.check_model_args(args) if self.check_model_args else []))

    def identity(self, args) -> dict:
        return {"dataset": args.dataset, "nb_classes": args.nb_classes, "finetune": args.finetune or None,
                **{f"{r}_list": file_fingerprint(getattr(args, f"{r}_list")) for r in ("train", "val", "test")},
                "label_fraction": args.label_fraction, "fraction_seed": args.fraction_seed,
                "chexpert_uncertain": args.chexpert_uncertain if args.dataset == "chexpert" else None,
                "build_timm_transform": args.build_timm_transform, "norm_stats": args.norm_stats,
                "exclude_list": file_fingerprint(args.exclude_list), "exclude_mode": args.exclude_mode,
                **({k: getattr(args, k) for k in CSV_COLUMNS} if args.dataset == "csv" else {})}

    def build_data(self, args, info, device) -> TaskData:
        self.findings = labelled.findings(args)
        self.splits = shared_splits(args, info, device)
        for split in self.splits.values():
            if split.write_as and info.is_main:  # a split drawn here (NODE21): kept so it can be given back
                split.write(os.path.join(args.output_dir, split.write_as))
        self.splits["train"] = labelled.label_fraction(self.splits["train"], args.label_fraction, args.fraction_seed,
                                                       args.output_dir, write=info.is_main)
        train_set = labelled.LabelledDataset(self.splits["train"], labelled.build_transform(args, is_train=True),
                                             args.dataset)
        image_bytes = args.in_chans * args.input_size ** 2 * 4
        fraction = f", --label_fraction {args.label_fraction:g}" if args.label_fraction < 1 else ""
        return TaskData(train=train_set, name=f"the training list ({len(train_set)} images{fraction})",
                        batch_bytes=args.batch_size * (image_bytes + 4 * len(self.findings) + 8),
                        extra=build_mixup(args, args.nb_classes, self.multi_label))

    def describe_data(self, args, info, data: TaskData) -> None:
        for split in self.splits.values():
            logger.info("%s list %s: %d images, %d patients", split.role, split.source, len(split),
                        len(np.unique(split.patients)))

    def build_model(self, args) -> torch.nn.Module:
        self.classifier = self.build_classifier(args)
        return self.classifier.model

    def build_optimizer(self, args, model, device) -> torch.optim.Optimizer:
        return build_optimizer(args, self.classifier, self.linear_probe)

    def initialise(self, run, state: ClassificationState) -> None:
        """--finetune: fill the encoder, logging every key loaded, adapted, missing (kept at initialisation) and
        ignored. The lists also go to results.json."""
        args = run.args
        if not args.finetune:
            logger.info("no --finetune checkpoint: the model starts from random initialisation")
            return
        try:
            report = self.classifier.load_pretrained(ckpt_lib.load_checkpoint(args.finetune, args.unsafe_full_unpickle))
        except (OSError, ValueError, SetupError) as e:
            raise SetupError(f"--finetune {args.finetune}: {e}") from e
        log_load_report(f"--finetune {args.finetune} ({args.checkpoint_type or 'format found from its keys'})",
                        report, kinds=("loaded", "adapted", "missing", "ignored"))
        state.pretrained_keys = report

    def complete_outputs(self, args) -> None:
        """A complete run whose plots are missing (a kill after results.json, an older version wrote that first)
        gets them again from test_predictions.csv and log.txt; nothing is scored again."""
        self.findings = labelled.findings(args)
        out = args.output_dir
        labels, scores = predictions.arrays(predictions.read(out, PREDICTIONS_NAME), self.findings, np.float32)
        aurocs = per_finding_auroc(scores, labels)
        expected = [roc_path(os.path.join(out, "roc"), name) for name, a in zip(self.findings, aurocs) if a is not None]
        if not all(os.path.isfile(p) for p in expected):
            with open(os.path.join(out, RESULTS_NAME), encoding="utf-8") as f:
                results = json.load(f)
            save_roc_curves(scores, labels, self.findings, aurocs, os.path.join(out, "roc"),
                            f"{results['model']}, test, epoch {results['selected_epoch']}")
            logger.info("roc/*.png were missing: drawn again from %s", PREDICTIONS_NAME)
        if not os.path.isfile(os.path.join(out, f"{self.selection.metric}.png")):
            self.after_epoch_plots(out)

    def set_train_mode(self, run) -> None:
        """The whole model in train mode, as the reference's probe runs it (drop path and dropout act in the frozen
        encoder; a CNN's BatchNorm statistics move); --frozen_encoder_eval keeps the frozen encoder in eval mode."""
        run.model.train()
        if self.linear_probe and run.args.frozen_encoder_eval:
            run.model_without_ddp.eval()
            self.classifier.head.train()

    def to_device(self, run, state, batch, step: int) -> tuple:
        images, targets, _ = batch
        return images.to(run.device, non_blocking=True), targets.to(run.device, non_blocking=True)

    def mix(self, run, batch: tuple) -> tuple:
        """Mixup/CutMix or label smoothing, at the step that trains on the batch: they draw from the global RNGs,
        whose checkpointed state must not include a batch prepared ahead (to_device), or resume would not be exact."""
        images, targets = batch
        mixup = run.data.extra
        if mixup is not None:
            return mixup(images, targets)
        if run.args.smoothing:
            targets = mixup_target(targets, len(self.findings), 1.0, run.args.smoothing, multi_label=self.multi_label)
        return images, targets

    def loss(self, run, batch: tuple) -> torch.Tensor:
        """BCE on each finding's logit (multi-label)."""
        images, targets = self.mix(run, batch)
        return torch.nn.functional.binary_cross_entropy_with_logits(run.model(images).float(), targets)

    @staticmethod
    def activation(logits: torch.Tensor) -> torch.Tensor:
        """Scores from logits: each finding's sigmoid (multi-label)."""
        return torch.sigmoid(logits)

    def evaluate(self, run, state, epoch: int, last: bool) -> dict:
        if epoch % run.args.eval_interval == 0 or last:
            return {"val_auroc": self.validate(run, epoch)}
        return {}

    def checkpoint_extra(self, run) -> dict:
        return {"findings": self.findings}

    def after_epoch(self, run, state) -> None:
        self.after_epoch_plots(run.args.output_dir)

    def after_epoch_plots(self, out: str) -> None:
        """The selecting metric per epoch: val_auroc.png (val_accuracy.png for single-label tasks)."""
        metric = self.selection.metric
        save_loss_curve(os.path.join(out, "log.txt"), os.path.join(out, f"{metric}.png"), keys=(metric,),
                        ylabel=self.selection.description)

    def finish(self, run, state: ClassificationState) -> None:
        if state.best_epoch is None:
            raise SetupError("no validation score selected a checkpoint: no finding has both classes in the "
                             f"validation list {self.splits['val'].source}")
        self.score_test(run, state, os.path.join(run.args.output_dir, ckpt_lib.BEST_NAME))

    # ---- scoring ----------------------------------------------------------------------------------------------

    def predict(self, run, split: labelled.Split) -> np.ndarray | None:
        """Scores [N, K] (self.activation) of a split in list order on rank 0 (None elsewhere), each rank scoring its
        share (engine.predict_in_shares)."""
        dataset = labelled.LabelledDataset(split, labelled.build_transform(run.args, is_train=False),
                                           run.args.dataset)
        model = run.model_without_ddp
        return predict_in_shares(
            run, dataset, lambda batch: self.activation(model(batch[0].to(run.device, non_blocking=True)).float()),
            split.role, dtype=np.float32)

    def validate(self, run, epoch: int) -> float | None:
        """Mean AUROC over findings on the validation list, the same value on every rank."""
        val = self.splits["val"]
        scores = self.predict(run, val)
        value = torch.zeros(2, device=run.device)
        if run.info.is_main:
            aurocs = per_finding_auroc(scores, val.labels)
            mean = mean_auroc(aurocs)
            if mean is not None:
                value[:] = torch.tensor([mean, 1.0])
                logger.info("epoch %d: validation mean AUROC %.4f (%s)", epoch, mean, ", ".join(
                    f"{name} {a:.3f}" for name, a in zip(self.findings, aurocs) if a is not None))
                for name, a in zip(self.findings, aurocs):
                    if a is not None:
                        run.run_log.scalar(f"val_auroc/{name}", a, (epoch + 1) * 1000)
            else:
                logger.warning("epoch %d: no finding has both classes in the validation list; nothing to select by",
                               epoch)
        dist_lib.all_reduce(value)
        if value[1] <= 0:
            return None
        run.run_log.scalar("val_auroc", float(value[0]), (epoch + 1) * 1000)
        return float(value[0])

    def score_test_list(self, run, weights: str | None) -> tuple[labelled.Split, np.ndarray | None, str]:
        """Read the test labels and images now, for the first time, and score them once with the `weights`
        checkpoint (None: the weights already loaded, --eval's --resume): (test split, scores on rank 0, weights)."""
        if weights is not None:
            run.model_without_ddp.load_state_dict(ckpt_lib.load_checkpoint(weights)["model"])
        weights = weights or run.args.resume
        test = labelled.load_labels(run.args, self.splits["test"])
        logger.info("scoring the test list %s once (%d images), with %s", test.source, len(test), weights)
        scores = self.predict(run, test)
        self.excluded = None
        if test.excluded is not None:  # --exclude_list: the results are the other images'; these are reported apart
            out = test.excluded
            self.excluded = (replace(test.subset(out, f"{test.source}, the images of --exclude_list"), excluded=None),
                             None if scores is None else scores[out])
            test = replace(test.subset(~out, f"{test.source} without the {int(out.sum())} images of --exclude_list"),
                           excluded=None)
            scores = None if scores is None else scores[~out]
        return test, scores, weights

    def excluded_report(self, run, metrics) -> dict | None:
        """results.json's account of the --exclude_list images: their count and names, and with --exclude_mode
        separate, metrics(split, scores) on them alone and their predictions in test_predictions_excluded.csv."""
        if self.excluded is None:
            return None
        split, scores = self.excluded
        report = {"list": run.args.exclude_list, "mode": run.args.exclude_mode, "images": len(split),
                  "names": image_names(split.paths)}
        if run.args.exclude_mode == "separate":
            report["metrics"] = metrics(split, scores)
            write_predictions(run.args.output_dir, self.prediction_table(split, scores), EXCLUDED_PREDICTIONS_NAME)
        logger.info("--exclude_list: %d test images reported apart (%s)", len(split), run.args.exclude_mode)
        return report

    def prediction_table(self, split: labelled.Split, scores: np.ndarray) -> dict:
        """image, patient, then each finding's label and score: the format of test_predictions.csv."""
        table = {"image": image_names(split.paths),
                 "patient": [p.decode() for p in split.patients]}
        for k, name in enumerate(self.findings):
            table[f"{name} label"] = split.labels[:, k]
            table[f"{name} score"] = scores[:, k]
        return table

    def score_test(self, run, state: ClassificationState, weights: str | None) -> None:
        """The test list scored once (score_test_list), then results.json, the table, the predictions and the ROC
        curves, results.json last."""
        args = run.args
        test, scores, weights = self.score_test_list(run, weights)
        val = self.splits["val"]
        val_scores = self.predict(run, val)  # the selected weights on validation, for thresholds chosen there
        if not run.info.is_main:
            return
        aurocs = per_finding_auroc(scores, test.labels)
        mean = mean_auroc(aurocs)
        start = time.time()
        ci = (bootstrap_auroc(scores, test.labels, test.patients, args.bootstrap, seed=args.seed) if args.bootstrap
              else None)
        if ci:
            logger.info("bootstrap: %d patient resamples in %.1f s", args.bootstrap, time.time() - start)
        out = args.output_dir
        train = self.splits["train"]
        results = {
            "task": self.name, "model": args.model, "dataset": args.dataset, "findings": self.findings,
            "checkpoint": os.path.abspath(weights),
            "selected_epoch": state.best_epoch, "selected_by": self.selection.description,
            "val_mean_auroc": state.best_score, "val_history": state.val_history,
            "val_list": self.splits["val"].source,
            "test": {
                "list": test.source, "images": len(test), "patients": int(len(np.unique(test.patients))),
                "mean_auroc": mean, "mean_auroc_ci95": ci["mean"] if ci else None,
                "per_finding": {name: {"auroc": a, "ci95": ci["per_finding"][k] if ci else None,
                                       "positives": int(test.labels[:, k].sum())}
                                for k, (name, a) in enumerate(zip(self.findings, aurocs))},
            },
            "bootstrap": {"resamples": args.bootstrap, "unit": "patient", "seed": args.seed, "level": 0.95},
            "label_fraction": args.label_fraction, "train_list": train.source, "train_images": len(train),
            "train_patients": int(len(np.unique(train.patients))), "input_size": args.input_size,
            "in_chans": args.in_chans, "pretrained": args.finetune or None,
            "pretrained_keys": state.pretrained_keys, "world_size": run.info.world_size, "git": git_commit(),
        }
        results["test"]["excluded"] = self.excluded_report(run, lambda split, s: {
            "mean_auroc": mean_auroc(per_finding_auroc(s, split.labels)),
            "per_finding": dict(zip(self.findings, per_finding_auroc(s, split.labels)))})
        # results.json last, every file atomically: a run is complete (and never scored again) only when all exist
        write_predictions(out, self.prediction_table(test, scores))
        write_predictions(out, self.prediction_table(val, val_scores), VAL_PREDICTIONS_NAME)
        save_roc_curves(scores, test.labels, self.findings, aurocs, os.path.join(out, "roc"),
                        f"{args.model}, test, epoch {state.best_epoch}")
        write_json(os.path.join(out, RESULTS_NAME), results)
        logger.info("%s", results_table(results))
        logger.info("wrote %s, %s and roc/*.png", os.path.join(out, RESULTS_NAME), PREDICTIONS_NAME)


def image_names(paths: np.ndarray) -> list[str]:
    """The images' names in the prediction files: the file names where they are unique (NIH, COVIDx), else the paths
    below the images' common folder (CheXpert's view1_frontal.jpg repeats in every study), so a name is a key."""
    paths = [p.decode() for p in paths]
    names = [os.path.basename(p) for p in paths]
    if len(set(names)) == len(names):
        return names
    common = os.path.commonpath(paths)
    return [os.path.relpath(p, common) for p in paths]


def write_predictions(out: str, table: dict, name: str = None) -> None:
    """test_predictions.csv (or `name`), atomically (results.json comes after it)."""
    path = os.path.join(out, name or PREDICTIONS_NAME)
    pd.DataFrame(table).to_csv(f"{path}.tmp", index=False)
    os.replace(f"{path}.tmp", path)


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


class SingleLabelTask(ClassificationTask):
    """Single-label classification (one class per image, --dataset covidx): cross-entropy on the logits, the
    checkpoint selected by validation accuracy, and on the test list the reference's report: the accuracy of the
    argmax over all logits, and after merging classes as the dataset says (data/covidx.py MERGE) a confusion matrix
    with each class's sensitivity and PPV, plus each class's one-vs-rest AUROC, with patient-bootstrap intervals."""

    multi_label = False
    selection = Selection("val_accuracy", higher_is_better=True, description="validation accuracy")

    def loss(self, run, batch: tuple) -> torch.Tensor:
        """Cross-entropy: class indices, or the soft targets of mixup and label smoothing."""
        images, targets = self.mix(run, batch)
        return torch.nn.functional.cross_entropy(run.model(images).float(), targets)

    @staticmethod
    def activation(logits: torch.Tensor) -> torch.Tensor:
        return torch.softmax(logits, dim=1)

    def describe_data(self, args, info, data: TaskData) -> None:
        """Each split's images, patients and class counts (the test list's read from its file, not kept)."""
        for split in self.splits.values():
            labels = split.labels if split.labels is not None else labelled.load_labels(args, split).labels
            counts = np.bincount(labels, minlength=len(self.findings))
            logger.info("%s list %s: %d images, %d patients; %s", split.role, split.source, len(split),
                        len(np.unique(split.patients)), ", ".join(f"{n} {c}" for n, c in zip(self.findings, counts)))

    def evaluate(self, run, state, epoch: int, last: bool) -> dict:
        if epoch % run.args.eval_interval == 0 or last:
            return {"val_accuracy": self.validate(run, epoch)}
        return {}

    def validate(self, run, epoch: int) -> float:
        """Accuracy on the validation list, the same value on every rank."""
        val = self.splits["val"]
        probabilities = self.predict(run, val)
        value = torch.zeros(1, device=run.device)
        if run.info.is_main:
            metrics = single_label_metrics(probabilities, val.labels)
            value[0] = metrics["accuracy"]
            logger.info("epoch %d: validation accuracy %.4f (sensitivity %s)", epoch, metrics["accuracy"], ", ".join(
                f"{name} {_fmt(s)}" for name, s in zip(self.findings, metrics["sensitivity"])))
        dist_lib.all_reduce(value)
        run.run_log.scalar("val_accuracy", float(value[0]), (epoch + 1) * 1000)
        return float(value[0])

    def finish(self, run, state) -> None:
        self.score_test(run, state, os.path.join(run.args.output_dir, ckpt_lib.BEST_NAME))

    def merge(self, dataset: str) -> tuple[list[int], list[str]]:
        """How the report merges classes, and the merged names (each class its own where the dataset says none)."""
        if dataset == "covidx":
            return covidx.MERGE, covidx.MERGED_CLASSES
        return list(range(len(self.findings))), list(self.findings)

    def prediction_table(self, split: labelled.Split, probabilities: np.ndarray) -> dict:
        """image, patient, the true and the predicted class, each class's probability."""
        table = {"image": image_names(split.paths), "patient": [p.decode() for p in split.patients],
                 "label": [self.findings[k] for k in split.labels],
                 "predicted": [self.findings[k] for k in probabilities.argmax(axis=1)]}
        for k, name in enumerate(self.findings):
            table[f"{name} probability"] = probabilities[:, k]
        return table

    def score_test(self, run, state, weights: str | None) -> None:
        args = run.args
        test, probabilities, weights = self.score_test_list(run, weights)
        if not run.info.is_main:
            return
        merge, merged_names = self.merge(args.dataset)
        metrics = single_label_metrics(probabilities, test.labels, merge)
        start = time.time()
        ci = (bootstrap_single_label(probabilities, test.labels, test.patients, args.bootstrap, merge, seed=args.seed)
              if args.bootstrap else None)
        if ci:
            logger.info("bootstrap: %d patient resamples in %.1f s", args.bootstrap, time.time() - start)
        out, train = args.output_dir, self.splits["train"]
        counts = {role: np.bincount(s.labels if s.labels is not None else test.labels,
                                    minlength=len(self.findings)).tolist()
                  for role, s in (("train", train), ("val", self.splits["val"]), ("test", test))}
        results = {
            "task": self.name, "kind": "single-label", "model": args.model, "dataset": args.dataset,
            "classes": self.findings, "checkpoint": os.path.abspath(weights),
            "selected_epoch": state.best_epoch, "selected_by": self.selection.description,
            "val_accuracy": state.best_score, "val_history": state.val_history, "val_list": self.splits["val"].source,
            "class_counts": counts,
            "test": {
                "list": test.source, "images": len(test), "patients": int(len(np.unique(test.patients))),
                "accuracy": metrics["accuracy"], "accuracy_ci95": ci["accuracy"] if ci else None,
                "accuracy_over": f"the argmax of all {len(self.findings)} logits",
                "merged_classes": merged_names, "confusion_matrix": metrics["confusion_matrix"],
                "confusion_matrix_axes": "rows: true class, columns: predicted, after the merge",
                "per_class": {name: {"sensitivity": metrics["sensitivity"][k],
                                     "sensitivity_ci95": ci["sensitivity"][k] if ci else None,
                                     "ppv": metrics["ppv"][k], "ppv_ci95": ci["ppv"][k] if ci else None}
                              for k, name in enumerate(merged_names)},
                "auroc": dict(zip(self.findings, metrics["auroc"])),
            },
            "bootstrap": {"resamples": args.bootstrap, "unit": "patient", "seed": args.seed, "level": 0.95},
            "label_fraction": args.label_fraction, "train_list": train.source, "train_images": len(train),
            "input_size": args.input_size, "in_chans": args.in_chans, "pretrained": args.finetune or None,
            "pretrained_keys": state.pretrained_keys, "world_size": run.info.world_size, "git": git_commit(),
        }
        results["test"]["excluded"] = self.excluded_report(run, lambda split, p: {
            "accuracy": single_label_metrics(p, split.labels, merge)["accuracy"]})
        write_predictions(out, self.prediction_table(test, probabilities))
        save_confusion_matrix(metrics["confusion_matrix"], merged_names, os.path.join(out, CONFUSION_NAME),
                              f"{args.model}, test, epoch {state.best_epoch}")
        write_json(os.path.join(out, RESULTS_NAME), results)  # last: the run is complete only when all exist
        logger.info("%s", single_label_table(results))
        logger.info("wrote %s, %s and %s", os.path.join(out, RESULTS_NAME), PREDICTIONS_NAME, CONFUSION_NAME)

    def complete_outputs(self, args) -> None:
        out = args.output_dir
        if not os.path.isfile(os.path.join(out, CONFUSION_NAME)):
            with open(os.path.join(out, RESULTS_NAME), encoding="utf-8") as f:
                results = json.load(f)
            test = results["test"]
            save_confusion_matrix(test["confusion_matrix"], test["merged_classes"], os.path.join(out, CONFUSION_NAME),
                                  f"{results['model']}, test, epoch {results['selected_epoch']}")
            logger.info("%s was missing: drawn again from %s", CONFUSION_NAME, RESULTS_NAME)
        if not os.path.isfile(os.path.join(out, f"{self.selection.metric}.png")):
            self.after_epoch_plots(out)


def single_label_table(results: dict) -> str:
    test = results["test"]
    ci = test["accuracy_ci95"]
    lines = [f"test accuracy on {test['list']} ({test['images']} images, {test['patients']} patients), "
             f"{results['task']} {results['model']}, checkpoint of epoch {results['selected_epoch']} (selected by "
             f"validation accuracy {_fmt(results['val_accuracy'])}): {_fmt(test['accuracy'])} {_fmt_ci(ci)}"]
    width = max(len(n) for n in test["merged_classes"])
    lines.append(f"  {'class':<{width}}  sensitivity                 PPV")
    for name, row in test["per_class"].items():
        lines.append(f"  {name:<{width}}  {_fmt(row['sensitivity'])} {_fmt_ci(row['sensitivity_ci95']):<18}  "
                     f"{_fmt(row['ppv'])} {_fmt_ci(row['ppv_ci95'])}")
    lines.append("  confusion matrix (rows true, columns predicted): " + str(test["confusion_matrix"]))
    return "\n".join(lines)
