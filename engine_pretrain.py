"""The masked-image-modelling pre-training task (ViT MAE and CNN U-Net), run by engine.py.

What it adds to the shared run: the multi-source pre-training pool (indexed and checked by rank 0, the others receive
the index), the reconstruction loss of the model's own forward, --gpu_augment on the device, --init_from, and per
epoch the reconstruction PNG with val_loss on a fixed batch and the optional linear probe (--probe_freq). Nothing is
selected: every epoch is kept as checkpoint-last.pth, and every --save_freq epochs as checkpoint-{epoch}.pth.
"""
import logging
import os

import numpy as np
import torch

import data as data_lib
from engine import Task, TaskData, TrainState, file_fingerprint, log_load_report
from util import checkpoint as ckpt_lib
from util import dist as dist_lib
from util import monitor
from util.errors import SetupError
from util.log import write_json
from util.model_api import PretrainModel
from util.optim import build_optimizer, load_optimizer_state
from util.vis import save_loss_curve

logger = logging.getLogger(__name__)

MASK_STRATEGIES = ("random",)
REPEATED_AUG = 3  # --repeated_aug: each sample this many times per epoch, as timm's RepeatAugSampler


def batch_bytes(args) -> int:
    """Bytes of one batch as the workers hand it over: uint8 canvases with --gpu_augment, else fp32 images."""
    if args.gpu_augment:
        return args.batch_size * args.gpu_augment_canvas ** 2
    return args.batch_size * args.in_chans * args.input_size ** 2 * 4


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


class PretrainTask(Task):
    """Masked reconstruction on the pre-training pool; `build_model(args)` makes a util.model_api.PretrainModel."""

    weights_flag = "--init_from"

    def __init__(self, build_model, check_model_args=None):
        self.factory = build_model
        self.check_model_args = check_model_args

    def check_args(self, args) -> list[str]:
        problems = data_lib.check_data_args(args)
        if not 0.0 <= args.mask_ratio < 1.0:
            problems.append(f"--mask_ratio is the fraction removed and must be in [0, 1), got {args.mask_ratio}")
        if args.mask_strategy not in MASK_STRATEGIES:
            problems.append(f"--mask_strategy {args.mask_strategy!r}: only 'random' is implemented (the reference's "
                            "heat-map strategies read a saliency file it never published); pass --mask_strategy random")
        if args.probe_freq < 0 or args.vis_freq < 0:
            problems.append("--probe_freq and --vis_freq must be >= 0")
        return problems + (self.check_model_args(args) if self.check_model_args else [])

    def identity(self, args) -> dict:
        return {"datasets_names": list(args.datasets_names), "train_list": file_fingerprint(args.train_list),
                "mask_ratio": args.mask_ratio, "norm_pix_loss": args.norm_pix_loss, "init_from": args.init_from or None}

    def build_data(self, args, info, device) -> TaskData:
        pretrain_data = data_lib.build_pretrain_data(
            data_lib.data_config(args), monitor=info.is_main,
            probe_images=args.probe_images if info.is_main and args.probe_freq > 0 else 0,
            pool=index_pool(args, info, device))
        return TaskData(train=pretrain_data.dataset, name="the data", batch_bytes=batch_bytes(args),
                        repeats=REPEATED_AUG if args.repeated_aug else 1, extra=pretrain_data)

    def describe_data(self, args, info, data: TaskData) -> None:
        if info.is_main:
            logger.info("%s", data_lib.format_count_tree(data.extra.counts))
            write_json(os.path.join(args.output_dir, "data_counts.json"), data.extra.counts)

    def build_model(self, args) -> torch.nn.Module:
        model = self.factory(args)
        if not isinstance(model, PretrainModel):
            raise TypeError(f"{type(model).__name__} lacks members of util.model_api.PretrainModel, the contract the "
                            "engine, the monitor and the tools rely on")
        return model

    def build_optimizer(self, args, model, device) -> torch.optim.Optimizer:
        return build_optimizer(model, args.weight_decay, args.lr, device, args.decay_tokens)

    def load_optimizer_state(self, run, state_dict: dict, path: str) -> None:
        load_optimizer_state(run.optimizer, state_dict, run.model_without_ddp, run.args.weight_decay,
                             run.args.decay_tokens, path)

    def initialise(self, run, state: TrainState) -> None:
        """--init_from: load what fits and say exactly what was and was not loaded."""
        path = run.args.init_from
        if not path:
            return
        try:
            checkpoint = ckpt_lib.load_checkpoint(path, run.args.unsafe_full_unpickle)
            report = run.model_without_ddp.load_pretrained(checkpoint)
        except (OSError, ValueError, SetupError) as e:
            raise SetupError(f"--init_from {path}: {e}") from e
        log_load_report(f"--init_from {path}", report)
        if not report["loaded"]:
            raise SetupError(f"--init_from {path}: no tensor matched this model; is it the right architecture?")

    def before_epochs(self, run, state: TrainState, resumed: dict | None) -> bool:
        if resumed is not None and run.args.init_from:
            logger.info("--init_from %s ignored: resuming from a checkpoint of this run", run.args.init_from)
        return True

    def to_device(self, run, state: TrainState, batch, step: int) -> tuple:
        """The images on the training device; with --gpu_augment, augmented there (seeded, so resume is exact)."""
        samples, replaced = batch
        replaced = int(replaced.sum())  # a CPU tensor from the loader: no device sync
        augment = run.data.extra.augment
        if augment is None:
            return samples.to(run.device, non_blocking=True), replaced
        canvas, hw, source = samples
        seed = (((run.args.seed * 1_000_003 + state.epoch) * 1_000_003 + step) * run.info.world_size
                + run.info.rank) % 2**63
        return augment(canvas.to(run.device, non_blocking=True), hw, source, seed), replaced

    def count(self, state: TrainState, batch: tuple) -> None:
        state.replaced_files += batch[1]

    def loss(self, run, batch: tuple) -> torch.Tensor:
        loss, _, _ = run.model(batch[0], mask_ratio=run.args.mask_ratio)
        return loss

    def evaluate(self, run, state: TrainState, epoch: int, last: bool) -> dict:
        args, metrics = run.args, {}
        if (args.vis_freq and epoch % args.vis_freq == 0) or last:
            metrics["val_loss"] = visualize(run, epoch)
        if run.data.extra.probe is not None and (epoch % args.probe_freq == 0 or last):
            metrics["probe_auroc"] = probe(run, epoch)
        return metrics

    def checkpoint_extra(self, run) -> dict:
        return {"norm_stats": run.data.extra.norm_stats}

    def after_epoch(self, run, state: TrainState) -> None:
        out = run.args.output_dir
        save_loss_curve(os.path.join(out, "log.txt"), os.path.join(out, "loss_curve.png"))


def visualize(run, epoch: int) -> float | None:
    """Reconstruction PNG + TensorBoard image and val_loss on the fixed monitor batch (rank 0)."""
    batch = run.data.extra.monitor
    if batch is None:
        return None
    mean, std = run.data.extra.norm_stats["per_source"][batch.source]
    path = os.path.join(run.args.output_dir, f"reconstruction-{epoch:04d}.png")
    loss, grid = monitor.reconstruction(run.model_without_ddp, batch.images, mean, std, run.args.mask_ratio, path,
                                        f"epoch {epoch}", run.precision, run.device)
    run.run_log.scalar("val_loss", loss, (epoch + 1) * 1000)
    run.run_log.image("reconstruction", np.asarray(grid), (epoch + 1) * 1000)
    logger.info("wrote %s (val_loss %.4f on %d monitor images, fixed mask seed)", path, loss, len(batch.images))
    return loss


def probe(run, epoch: int) -> float | None:
    """Mean AUROC of a linear probe on the frozen encoder (rank 0); logged as probe_auroc."""
    subset = run.data.extra.probe
    value, scored = monitor.probe_auroc(run.model_without_ddp, subset.train, subset.test, run.precision, run.device)
    if value is None:
        logger.info("linear probe: no finding has both classes among the scoring images; nothing to report")
        return None
    run.run_log.scalar("probe_auroc", value, (epoch + 1) * 1000)
    logger.info("linear probe: mean AUROC %.4f over %d findings", value, scored)
    return value
