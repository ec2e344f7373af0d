"""The segmentation task, run by engine.py: binary masks (pneumothorax, lungs) from a pre-trained U-Net or ViT.

What it adds to the shared run: the image/mask splits (data/segmentation.py: rank 0 reads and checks them, the other
ranks receive them), the pre-trained weights (--finetune, the whole U-Net or its encoder alone by --decoder_init,
with a report of every key loaded, adapted and new), Dice + BCE on the mask logits (--loss), and the classification
protocol: every --eval_interval epochs the validation list is scored, the best mean validation Dice is kept as
checkpoint-best.pth, and after the last epoch the test list is scored once with it. Dice and IoU are per image, at
--input_size (masks resized with nearest neighbour), with SIIM-ACR's convention that an empty prediction on an empty
mask scores 1; results.json also gives the mean Dice over the images whose mask is not empty, which has no such
convention. Outputs: results.json, test_metrics.csv (one row per image), overlays of the best and worst test images,
and the validation Dice curve (val_dice.png).
"""
import logging
import os
import pickle
import time
from dataclasses import dataclass, replace

import numpy as np
import pandas as pd
import torch
from segmentation_models_pytorch.losses import DiceLoss

from data import segmentation
from data.labelled import label_fraction
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
from util.errors import SetupError
from util.log import git_commit, write_json
from util.metrics import bootstrap_segmentation, dice_iou
from util.model_api import Segmenter
from util.precision import autocast
from util.vis import save_loss_curve, save_segmentation_overlays

logger = logging.getLogger(__name__)

LOSSES = ("dice_bce", "dice", "bce")
RESULTS_NAME = "results.json"  # written last: its presence means the test list was scored
METRICS_NAME = "test_metrics.csv"
EXCLUDED_METRICS_NAME = "test_metrics_excluded.csv"  # --exclude_list --exclude_mode separate
OVERLAYS = {"best": "overlays_best.png", "worst": "overlays_worst.png"}
OVERLAY_CASES = 4  # test images per overlay figure
THRESHOLD = 0.5  # on the sigmoid of the mask logit
# where the images and masks are found (--dataset folder and csv)
LAYOUT_FLAGS = ("image_dir", "mask_dir", "mask_suffix", "image_column", "mask_column", "patient_column")
# what decides how a checkpoint's test images are prepared: --eval must score with its run's values
EVAL_SETTINGS = ("dataset", "input_size", "in_chans", "norm_stats")


@dataclass
class SegmentationState(SelectionState):
    pretrained_keys: dict | None = checkpointed(None)  # --finetune's load report, for results.json


@dataclass
class Scored:
    """Per-image results of one split in list order (rank 0)."""

    dice: np.ndarray
    iou: np.ndarray
    truth_pixels: np.ndarray
    predicted_pixels: np.ndarray

    def subset(self, keep: np.ndarray) -> "Scored":
        return Scored(self.dice[keep], self.iou[keep], self.truth_pixels[keep], self.predicted_pixels[keep])


def check_args(args) -> list[str]:
    """The segmentation flags beyond the common ones and the model's (the entry script checks those)."""
    problems = segmentation.check_data_args(args)
    if args.eval_interval < 1:
        problems.append(f"--eval_interval must be >= 1, got {args.eval_interval}")
    for flag in ("patience", "bootstrap"):
        if getattr(args, flag) < 0:
            problems.append(f"--{flag} must be >= 0, got {getattr(args, flag)}")
    if not 0.0 <= args.drop_path < 1.0:
        problems.append(f"--drop_path must be in [0, 1), got {args.drop_path}")
    if args.eval and not args.resume:
        problems.append("--eval scores a trained segmentation model: pass --resume with a checkpoint of this script")
    return problems


class SegmentationTask(ScoredOnceTask):
    """Binary segmentation: one mask logit per pixel. `build_segmenter(args)` makes a util.model_api.Segmenter;
    `check_model_args(args)` lists problems with the model flags."""

    name = "segment"
    state_class = SegmentationState
    results_name = RESULTS_NAME
    eval_settings = EVAL_SETTINGS
    weights_flag = "--finetune"
    selection = Selection("val_dice", higher_is_better=True, description="mean validation Dice")

    def __init__(self, build_segmenter, check_model_args):
        self.build_segmenter, self.check_model_args = build_segmenter, check_model_args
        self.segmenter: Segmenter | None = None
        self.splits: dict[str, segmentation.SegSplit] = {}
        self.dice_loss = DiceLoss(mode="binary", from_logits=True)

    def check_args(self, args) -> list[str]:
        return check_args(args) + self.check_model_args(args)

    def identity(self, args) -> dict:
        return {"dataset": args.dataset, "data_path": os.path.abspath(args.data_path),
                **{f"{r}_list": file_fingerprint(getattr(args, f"{r}_list")) for r in segmentation.ROLES},
                "label_fraction": args.label_fraction, "fraction_seed": args.fraction_seed,
                "finetune": args.finetune or None, "decoder_init": args.decoder_init, "loss": args.loss,
                "norm_stats": args.norm_stats, "crop_scale": list(args.crop_scale), "hflip_prob": args.hflip_prob,
                "exclude_list": file_fingerprint(args.exclude_list), "exclude_mode": args.exclude_mode,
                **{k: getattr(args, k) for k in LAYOUT_FLAGS}}

    # ---- data -----------------------------------------------------------------------------------------------------

    def build_data(self, args, info, device) -> TaskData:
        built = None

        def build() -> bytes:  # rank 0 reads the dataset; the others receive its splits and touch no file
            nonlocal built
            built = segmentation.build_splits(args)
            return pickle.dumps(built) if info.distributed else b""

        payload = dist_lib.share_from_main(info, device, build)
        self.splits, drawn = built if info.is_main else pickle.loads(payload)
        if drawn:  # kept, so the same split can be passed back and shared
            for role, split in self.splits.items():
                path = os.path.join(args.output_dir, f"seg_{role}.csv")
                if info.is_main:
                    split.write(path)
                self.splits[role] = replace(split, source=f"{path} (drawn with --fraction_seed {args.fraction_seed})")
        self.splits["train"] = label_fraction(self.splits["train"], args.label_fraction, args.fraction_seed,
                                              args.output_dir, write=info.is_main, prefix="seg_train")
        train = segmentation.SegmentationDataset(self.splits["train"], segmentation.build_transform(args, True))
        pixels = args.input_size ** 2
        fraction = f", --label_fraction {args.label_fraction:g}" if args.label_fraction < 1 else ""
        return TaskData(train=train, name=f"the training list ({len(train)} images{fraction})",
                        batch_bytes=args.batch_size * (args.in_chans * pixels * 4 + pixels * 4 + 8))

    def describe_data(self, args, info, data: TaskData) -> None:
        for split in self.splits.values():
            logger.info("%s list %s: %d images, %d patients", split.role, split.source, len(split),
                        len(np.unique(split.patients)))

    # ---- model ----------------------------------------------------------------------------------------------------

    def build_model(self, args) -> torch.nn.Module:
        self.segmenter = self.build_segmenter(args)
        return self.segmenter.model

    def build_optimizer(self, args, model, device) -> torch.optim.Optimizer:
        return torch.optim.AdamW(self.segmenter.param_groups(args.weight_decay), lr=args.lr)

    def initialise(self, run, state: SegmentationState) -> None:
        args = run.args
        if not args.finetune:
            logger.info("no --finetune checkpoint: the model starts from random initialisation")
            return
        try:
            report = self.segmenter.load_pretrained(ckpt_lib.load_checkpoint(args.finetune, args.unsafe_full_unpickle),
                                                    args.decoder_init)
        except (OSError, ValueError, SetupError) as e:
            raise SetupError(f"--finetune {args.finetune}: {e}") from e
        log_load_report(f"--finetune {args.finetune} (--decoder_init {args.decoder_init})",
                        {**report, "missing": report["new"]}, kinds=("adapted", "missing"))
        state.pretrained_keys = report

    # ---- training -------------------------------------------------------------------------------------------------

    def to_device(self, run, state, batch, step: int) -> tuple:
        images, masks, _ = batch
        return images.to(run.device, non_blocking=True), masks.to(run.device, non_blocking=True)

    def loss(self, run, batch: tuple) -> torch.Tensor:
        images, masks = batch
        logits = run.model(images).float()
        loss = run.args.loss
        total = torch.zeros((), device=logits.device)
        if loss in ("dice_bce", "bce"):
            total = total + torch.nn.functional.binary_cross_entropy_with_logits(logits, masks)
        if loss in ("dice_bce", "dice"):
            total = total + self.dice_loss(logits, masks)
        return total

    # ---- scoring --------------------------------------------------------------------------------------------------

    def predict(self, run, split: segmentation.SegSplit) -> Scored | None:
        """Per-image Dice and IoU of a split on rank 0 (None elsewhere), each rank scoring its share
        (engine.predict_in_shares)."""
        dataset = segmentation.SegmentationDataset(split, segmentation.build_transform(run.args, is_train=False))
        model = run.model_without_ddp

        def score(batch):
            images, masks, _ = batch
            predicted = (torch.sigmoid(model(images.to(run.device, non_blocking=True)).float()) > THRESHOLD).cpu()
            truth = masks > 0.5
            dice, iou = dice_iou(predicted, truth)
            return torch.stack([dice, iou, truth.flatten(1).sum(1).double(), predicted.flatten(1).sum(1).double()],
                               dim=1)

        out = predict_in_shares(run, dataset, score, split.role)
        return None if out is None else Scored(out[:, 0], out[:, 1], out[:, 2].astype(int), out[:, 3].astype(int))

    def evaluate(self, run, state, epoch: int, last: bool) -> dict:
        if epoch % run.args.eval_interval and not last:
            return {}
        scored = self.predict(run, self.splits["val"])
        value = torch.zeros(1, device=run.device)
        if run.info.is_main:
            value[0] = float(scored.dice.mean())
            logger.info("epoch %d: validation mean Dice %.4f, IoU %.4f (%d images)", epoch, value[0],
                        scored.iou.mean(), len(scored.dice))
        dist_lib.all_reduce(value)
        run.run_log.scalar("val_dice", float(value[0]), (epoch + 1) * 1000)
        return {"val_dice": float(value[0])}

    def after_epoch(self, run, state) -> None:
        out = run.args.output_dir
        save_loss_curve(os.path.join(out, "log.txt"), os.path.join(out, "val_dice.png"), keys=("val_dice",),
                        ylabel=self.selection.description)

    def finish(self, run, state: SegmentationState) -> None:
        self.score_test(run, state, os.path.join(run.args.output_dir, ckpt_lib.BEST_NAME))

    def score_test(self, run, state: SegmentationState, weights: str | None) -> None:
        """The test list scored once with `weights` (None: --eval's --resume, already loaded), then the per-image
        table, the overlays and results.json, last."""
        args = run.args
        if weights is not None:
            run.model_without_ddp.load_state_dict(ckpt_lib.load_checkpoint(weights)["model"])
        weights = weights or args.resume
        test = self.splits["test"]
        logger.info("scoring the test list %s once (%d images), with %s", test.source, len(test), weights)
        scored = self.predict(run, test)
        if not run.info.is_main:
            return
        out = args.output_dir
        excluded = None
        if test.excluded is not None:  # --exclude_list: the results are the other images'; these are reported apart
            mask = test.excluded
            excluded = {"list": args.exclude_list, "mode": args.exclude_mode, "images": int(mask.sum()),
                        "names": [n for n, x in zip(test.names, mask) if x]}
            if args.exclude_mode == "separate":
                apart = scored.subset(mask)
                excluded["metrics"] = {"mean_dice": float(apart.dice.mean()), "mean_iou": float(apart.iou.mean())}
                write_metrics(out, test.subset(mask, test.source), apart, EXCLUDED_METRICS_NAME)
            logger.info("--exclude_list: %d test images reported apart (%s)", excluded["images"], args.exclude_mode)
            test = test.subset(~mask, f"{test.source} without the {int(mask.sum())} images of --exclude_list")
            scored = scored.subset(~mask)
        empty = scored.truth_pixels == 0
        start = time.time()
        ci = (bootstrap_segmentation(scored.dice, scored.iou, empty, test.patients, args.bootstrap, seed=args.seed)
              if args.bootstrap else None)
        if ci:
            logger.info("bootstrap: %d patient resamples in %.1f s", args.bootstrap, time.time() - start)
        train = self.splits["train"]
        write_metrics(out, test, scored, METRICS_NAME)
        self.save_overlays(run, test, scored, f"{args.model}, test, epoch {state.best_epoch}")
        non_empty = scored.dice[~empty]
        results = {
            "task": self.name, "model": args.model, "dataset": args.dataset, "checkpoint": os.path.abspath(weights),
            "selected_epoch": state.best_epoch, "selected_by": self.selection.description,
            "val_mean_dice": state.best_score, "val_history": state.val_history,
            "test": {
                "list": test.source, "images": len(test), "patients": int(len(np.unique(test.patients))),
                "images_with_empty_mask": int(empty.sum()),
                "mean_dice": float(scored.dice.mean()), "mean_dice_ci95": ci["dice"] if ci else None,
                "mean_iou": float(scored.iou.mean()), "mean_iou_ci95": ci["iou"] if ci else None,
                "mean_dice_non_empty": float(non_empty.mean()) if len(non_empty) else None,
                "mean_dice_non_empty_ci95": ci["dice_non_empty"] if ci else None,
                "empty_prediction_baseline": float(empty.mean()),  # the mean Dice of predicting no mask anywhere
                "empty_mask_prediction_rate": float((scored.predicted_pixels[empty] == 0).mean()) if empty.any()
                else None,
                "convention": "per image at --input_size; mean_dice and mean_iou score an empty prediction on an "
                              "empty mask as 1 (SIIM-ACR); mean_dice_non_empty averages the images whose mask is "
                              "not empty",
                "threshold": THRESHOLD, "excluded": excluded,
            },
            "bootstrap": {"resamples": args.bootstrap, "unit": "patient", "seed": args.seed, "level": 0.95},
            "loss": args.loss, "decoder_init": args.decoder_init, "label_fraction": args.label_fraction,
            "train_list": train.source, "train_images": len(train),
            "train_patients": int(len(np.unique(train.patients))), "val_list": self.splits["val"].source,
            "input_size": args.input_size, "in_chans": args.in_chans, "pretrained": args.finetune or None,
            "pretrained_keys": state.pretrained_keys, "world_size": run.info.world_size, "git": git_commit(),
        }
        write_json(os.path.join(out, RESULTS_NAME), results)
        logger.info("%s", results_table(results))
        logger.info("wrote %s, %s and %s", os.path.join(out, RESULTS_NAME), METRICS_NAME, ", ".join(OVERLAYS.values()))

    @torch.no_grad()
    def save_overlays(self, run, test: segmentation.SegSplit, scored: Scored, title: str) -> None:
        """The OVERLAY_CASES best and worst test images by Dice (ties: the larger true mask first), predicted again
        on rank 0 (a handful of images)."""
        order = np.lexsort((-scored.truth_pixels, -scored.dice))  # best first
        dataset = segmentation.SegmentationDataset(test, segmentation.build_transform(run.args, is_train=False))
        mean, std = dataset.transform.normalize.mean[0], dataset.transform.normalize.std[0]
        model = run.model_without_ddp.eval()
        for which, picks in (("best", order[:OVERLAY_CASES]), ("worst", order[::-1][:OVERLAY_CASES])):
            cases = []
            for i in picks:
                image, mask, _ = dataset[int(i)]
                with autocast(run.precision, run.device):
                    logits = model(image[None].to(run.device))
                gray = ((image[0] * std + mean) * 255).clamp(0, 255).to(torch.uint8).numpy()
                cases.append({"image": gray, "truth": mask[0].numpy() > 0.5,
                              "predicted": (torch.sigmoid(logits.float()) > THRESHOLD)[0, 0].cpu().numpy(),
                              "label": f"{short(test.names[i])}\nDice {scored.dice[i]:.3f}"})
            save_segmentation_overlays(cases, os.path.join(run.args.output_dir, OVERLAYS[which]),
                                       f"{title}: {which} {len(cases)} by Dice")


def write_metrics(out: str, split: segmentation.SegSplit, scored: Scored, name: str) -> None:
    """One row per image (image, patient, Dice, IoU, true and predicted pixels), atomically."""
    table = pd.DataFrame({"image": split.names, "patient": [p.decode() for p in split.patients],
                          "dice": scored.dice, "iou": scored.iou, "truth_pixels": scored.truth_pixels,
                          "predicted_pixels": scored.predicted_pixels})
    path = os.path.join(out, name)
    table.to_csv(path + ".tmp", index=False)
    os.replace(path + ".tmp", path)


def short(name: str, width: int = 28) -> str:
    """A long image name (SIIM's ImageIds are DICOM UIDs) cut to its end, for figure titles."""
    return name if len(name) <= width else "..." + name[-(width - 3):]


def results_table(results: dict) -> str:
    test = results["test"]

    def fmt(value, ci):
        text = "n/a" if value is None else f"{value:.4f}"
        return text + (f" [{ci[0]:.4f}, {ci[1]:.4f}]" if ci else "")

    return "\n".join([
        f"test on {test['list']} ({test['images']} images, {test['patients']} patients, "
        f"{test['images_with_empty_mask']} with an empty mask), {results['model']}, checkpoint of epoch "
        f"{results['selected_epoch']} (selected by "
        f"mean validation Dice {fmt(results['val_mean_dice'], None)})",
        f"  mean Dice            {fmt(test['mean_dice'], test['mean_dice_ci95'])}",
        f"  mean IoU             {fmt(test['mean_iou'], test['mean_iou_ci95'])}",
        f"  Dice, non-empty mask {fmt(test['mean_dice_non_empty'], test['mean_dice_non_empty_ci95'])}",
        f"  (an empty prediction everywhere would score mean Dice {test['empty_prediction_baseline']:.4f})",
        f"  ({test['convention']})"])
