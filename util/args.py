"""Flags shared by both entry scripts (the reference parser plus the new options), and their checks."""
import argparse
import enum

PRECISIONS = ("auto", "fp32", "fp16", "bf16")
HEARTBEAT_INTERVAL_S = 1.0  # util.dist.Heartbeat beats this often; --heartbeat_timeout must cover 3 beats


class ExitCode(enum.IntEnum):
    """The entry scripts' exit statuses (PRETRAIN.md section 6); scripts/slurm_pretrain.sh requeues on PREEMPTED."""

    OK = 0
    FAILED = 1  # bad input before training, a bad file under --bad_files error, or a failed rank
    TOO_MANY_BAD_STEPS = 2  # --max_bad_steps non-finite steps in a row, after a checkpoint
    PREEMPTED = 3  # SIGTERM/SIGUSR1: checkpoint-last written, requeue the job


def add_bool_flag(group, name: str, default: bool, help: str) -> None:
    """--name / --no_name (also --no-name), in the project's underscore spelling."""
    group.add_argument(f"--{name}", dest=name, action="store_true", default=default,
                       help=f"{help} (default: {'on' if default else 'off'}; --no_{name} turns it off)")
    group.add_argument(f"--no_{name}", f"--no-{name}", dest=name, action="store_false", default=default,
                       help=argparse.SUPPRESS)


def add_common_args(parser: argparse.ArgumentParser, *, batch_size: int, epochs: int, weight_decay: float,
                    blr: float, min_lr: float, warmup_epochs: int, save_freq: int, layer_decay: float | None = None,
                    output_help: str = "where checkpoints and log.txt go") -> None:
    """The flags every training script shares, each declared here once; the defaults are the calling script's
    (the reference's per script). The task's own groups, the model group and the data group are added beside."""
    run = parser.add_argument_group("Run")
    run.add_argument("--batch_size", default=batch_size, type=int,
                     help="batch size per process; effective batch = batch_size * accum_iter * world size "
                          f"(default: {batch_size})")
    run.add_argument("--epochs", default=epochs, type=int, help=f"number of epochs (default: {epochs})")
    run.add_argument("--accum_iter", default=1, type=int,
                     help="accumulate gradients over this many iterations before a step (default: 1)")
    run.add_argument("--device", default=None, type=str,
                     help="device to train on, e.g. cuda or cpu (default: cuda when available, else cpu)")
    run.add_argument("--seed", default=0, type=int, help="random seed; each rank adds its rank (default: 0)")
    run.add_argument("--num_workers", default=10, type=int, help="data-loading worker processes (default: 10)")
    add_bool_flag(run, "pin_mem", True, "pin CPU memory in the loader")
    add_bool_flag(run, "keep_freed_memory", True,
                  "on CPU runs, keep freed memory in the process (glibc malloc) instead of returning it to the OS, so "
                  "each step does not page-fault its activations in again; faster CPU steps, resident memory stays at "
                  "its peak; GPU runs are unaffected")
    run.add_argument("--max_steps_per_epoch", default=None, type=int,
                     help="cap the optimizer steps of an epoch, for smoke tests and demos (default: no cap)")

    opt = parser.add_argument_group("Optimiser")
    opt.add_argument("--weight_decay", type=float, default=weight_decay,
                     help=f"weight decay; biases and 1-D tensors (norms) are not decayed (default: {weight_decay:g})")
    if layer_decay is not None:
        opt.add_argument("--layer_decay", type=float, default=layer_decay,
                         help="ViT layer-wise LR decay: block i of L gets lr * layer_decay^(L + 1 - i), timm's "
                              f"param_groups_layer_decay; CNNs ignore it (default: {layer_decay:g})")
    opt.add_argument("--lr", type=float, default=None, metavar="LR",
                     help="absolute learning rate (default: derived, blr * effective batch / 256)")
    opt.add_argument("--blr", type=float, default=blr, metavar="LR",
                     help=f"base learning rate: lr = blr * effective batch / 256 (default: {blr:g})")
    opt.add_argument("--min_lr", type=float, default=min_lr, help=f"floor of the cosine schedule (default: {min_lr:g})")
    opt.add_argument("--warmup_epochs", type=int, default=warmup_epochs,
                     help=f"epochs of linear LR warmup (default: {warmup_epochs})")
    opt.add_argument("--fixed_lr", action="store_true", help="constant LR after warmup, no cosine (default: off)")
    opt.add_argument("--clip_grad", type=float, default=None, help="clip the gradient norm to this (default: off)")

    prec = parser.add_argument_group("Precision and speed")
    prec.add_argument("--precision", default="auto", choices=PRECISIONS,
                      help="auto: bf16 on GPUs with native bf16 (compute capability >= 8), fp16 on older GPUs, fp32 on "
                           "CPU (default: auto)")
    prec.add_argument("--compile", action="store_true", help="torch.compile the model (default: off)")
    prec.add_argument("--deterministic", action="store_true",
                      help="deterministic kernels only (cuDNN without autotuning, math attention on CUDA): slower, "
                           "but a rerun or a resume reproduces the weights bit for bit (default: off)")

    ckpt = parser.add_argument_group("Checkpoints and logs")
    ckpt.add_argument("--output_dir", default="./output_dir", help=f"{output_help} (default: ./output_dir)")
    ckpt.add_argument("--log_dir", default="./output_dir", help="TensorBoard folder (default: ./output_dir)")
    ckpt.add_argument("--resume", default="", help="resume from this checkpoint (default: none; see --auto_resume)")
    ckpt.add_argument("--start_epoch", default=0, type=int, metavar="N", help="first epoch (default: 0)")
    add_bool_flag(ckpt, "auto_resume", True, "continue from the newest good checkpoint in output_dir")
    ckpt.add_argument("--unsafe_full_unpickle", action="store_true",
                      help="load --resume, --finetune and --init_from files with any pickled object allowed "
                           "(torch.load weights_only=False), which can run code: only for a file you trust that the "
                           "safe loader refuses, naming the object (default: off)")
    ckpt.add_argument("--resume_with_changes", action="store_true",
                      help="continue the run in --output_dir although this command changes what it trains or scores "
                           "(model, data lists or their content, task settings); without it such a rerun is refused, "
                           "naming the flags that differ (default: off)")
    ckpt.add_argument("--save_freq", default=save_freq, type=int,
                      help="also keep checkpoint-{epoch}.pth every N epochs and at the last; 0: only "
                           f"checkpoint-last.pth (and checkpoint-best.pth where a run selects) (default: {save_freq})")
    ckpt.add_argument("--save_every_steps", default=0, type=int,
                      help="also write checkpoint-last.pth every N optimizer steps inside an epoch (default: 0, off)")
    ckpt.add_argument("--keep_last", default=0, type=int,
                      help="keep only the newest N checkpoint-{epoch}.pth files; 0 keeps all (default: 0)")
    ckpt.add_argument("--max_bad_steps", default=20, type=int,
                      help="stop after this many non-finite steps in a row, after a checkpoint (default: 20)")
    ckpt.add_argument("--print_freq", default=20, type=int, help="progress line every N iterations (default: 20)")

    dist = parser.add_argument_group("Distributed")
    dist.add_argument("--world_size", default=1, type=int,
                      help="number of processes; the launcher's environment wins (default: 1)")
    dist.add_argument("--local_rank", "--local-rank", default=-1, type=int,
                      help="accepted for torch.distributed.launch; LOCAL_RANK from the environment wins")
    dist.add_argument("--dist_on_itp", action="store_true", help="read ranks from OpenMPI variables (default: off)")
    dist.add_argument("--dist_url", default="env://", help="url used to set up distributed training (default: env://)")
    dist.add_argument("--dist_timeout", default=600, type=int,
                      help="seconds a collective may wait for a dead or stuck rank before failing (default: 600)")
    dist.add_argument("--heartbeat_timeout", default=60, type=float,
                      help="seconds without a heartbeat after which a rank counts as dead (killed, crashed or "
                           "SIGSTOPped) and every rank stops, on any backend (default: 60)")
    dist.add_argument("--force_process_group", action="store_true",
                      help="join a process group and wrap the model in DDP even as a single process, to exercise "
                           "the NCCL/gloo code paths on one device (default: off)")


def add_pretrain_args(parser: argparse.ArgumentParser) -> None:
    """The pre-training scripts' own flags (the reference's MAE flags and this project's monitoring)."""
    add_common_args(parser, batch_size=64, epochs=400, weight_decay=0.05, blr=1e-3, min_lr=0.0, warmup_epochs=40,
                    save_freq=20)
    mae = parser.add_argument_group("Masked image modelling")
    mae.add_argument("--mask_ratio", default=0.75, type=float,
                     help="fraction of patches removed, in [0, 1) (default: 0.75)")
    mae.add_argument("--norm_pix_loss", action="store_true",
                     help="use per-patch normalised pixels as the reconstruction target (default: off)")
    mae.add_argument("--mask_strategy", default="random", type=str,
                     help="masking rule: 'random' (per-sample uniform noise, argsort), the only one; the reference's "
                          "heat-map modes needed a file it never shipped, and are refused (default: random)")
    mae.add_argument("--repeated-aug", "--repeated_aug", action="store_true", dest="repeated_aug",
                     help="repeat each sample 3 times per epoch across ranks, with different augmentations "
                          "(default: off)")
    add_bool_flag(mae, "decay_tokens", True,
                  "decay the cls and mask tokens too, as the reference (timm's add_weight_decay) does; "
                  "--no_decay_tokens exempts them, which changes the parameter groups, so a reference optimizer "
                  "state no longer loads")
    mae.add_argument("--init_from", default="",
                     help="start from these weights: a full MAE or U-Net checkpoint, an encoder export, or a "
                          "timm/torchvision backbone; prints what was loaded (default: none)")
    mon = parser.add_argument_group("Monitoring")
    mon.add_argument("--vis_freq", default=0, type=int,
                     help="every N epochs write a reconstruction PNG and val_loss on a held-out batch (default: 0, "
                          "only at the end of training)")
    mon.add_argument("--probe_freq", default=0, type=int,
                     help="every N epochs, fit a linear probe on frozen features for the findings of a labelled "
                          "subset (CheXpert, NIH) and log its mean AUROC as probe_auroc (default: 0, off)")
    mon.add_argument("--probe_images", default=512, type=int,
                     help="size of the fixed labelled subset for --probe_freq, split by patient (default: 512)")


def validate_args(args, extra_problems=()) -> None:
    """Collect every problem with the common flags plus the task's (extra_problems) and raise once, naming each
    flag; called before any process group or compute."""
    problems = list(extra_problems)
    for flag in ("batch_size", "epochs", "accum_iter", "input_size"):
        if getattr(args, flag) < 1:
            problems.append(f"--{flag} must be >= 1, got {getattr(args, flag)}")
    for flag in ("warmup_epochs", "save_freq", "save_every_steps", "keep_last"):
        if getattr(args, flag) < 0:
            problems.append(f"--{flag} must be >= 0, got {getattr(args, flag)}")
    if args.blr <= 0 and args.lr is None:
        problems.append(f"--blr must be > 0, got {args.blr}")
    if args.max_bad_steps < 1:
        problems.append(f"--max_bad_steps must be >= 1, got {args.max_bad_steps}")
    problems += distributed_problems(args)
    if args.resume and args.start_epoch:
        problems.append("--resume and --start_epoch conflict: the checkpoint sets the epoch")
    if problems:
        raise SystemExit("invalid arguments:\n  " + "\n  ".join(problems))


def distributed_problems(args) -> list[str]:
    if args.heartbeat_timeout < 3 * HEARTBEAT_INTERVAL_S:
        return [f"--heartbeat_timeout must be at least {3 * HEARTBEAT_INTERVAL_S:g} s (3 heartbeats), got "
                f"{args.heartbeat_timeout:g}"]
    return []


def argument_warnings(args) -> list[str]:
    """Flag combinations that run, as in the reference, but are probably not what was meant."""
    warnings = []
    if args.warmup_epochs > args.epochs:
        warnings.append(f"--warmup_epochs {args.warmup_epochs} is more than --epochs {args.epochs}: the whole run "
                        f"is warmup and the LR ends near {args.epochs / args.warmup_epochs:.0%} of its peak, never "
                        "reaching it or the cosine decay "
                        "(fine for a smoke test; for a real run lower --warmup_epochs)")
    return warnings


def resolve_lr(args, world_size: int) -> int:
    """lr = blr * eff_batch / 256 unless --lr is given; returns the effective batch."""
    eff_batch_size = args.batch_size * args.accum_iter * world_size
    if args.lr is None:
        args.lr = args.blr * eff_batch_size / 256
    return eff_batch_size


# ---- fine-tuning and linear probing (main_finetune_chestxray.py, main_linprobe_chestxray.py) --------------------

def add_finetune_args(parser: argparse.ArgumentParser, linear_probe: bool) -> None:
    """MAE's main_finetune / main_linprobe flags (the reference's names and defaults), plus the protocol flags; the
    model group is added by the entry script and the data group by data/labelled.py."""
    add_common_args(parser, batch_size=512 if linear_probe else 64, epochs=90 if linear_probe else 50,
                    weight_decay=0.0 if linear_probe else 0.05, blr=0.1 if linear_probe else 1e-3,
                    min_lr=0.0 if linear_probe else 1e-6, warmup_epochs=10 if linear_probe else 5, save_freq=0,
                    layer_decay=None if linear_probe else 0.75,
                    output_help="checkpoints, log.txt, results.json and plots")

    aug = parser.add_argument_group("Augmentation and loss (timm's implementations)")
    aug.add_argument("--build_timm_transform", action="store_true",
                     help="timm's create_transform for training and evaluation (RandomResizedCrop, flip, --aa, "
                          "--reprob; centre crop for evaluation) instead of the plain resize + flip (default: off)")
    aug.add_argument("--aa", type=str, default="rand-m9-mstd0.5-inc1", metavar="NAME",
                     help="RandAugment policy with --build_timm_transform; 'none' for none "
                          "(default: rand-m9-mstd0.5-inc1)")
    aug.add_argument("--reprob", type=float, default=0.0 if linear_probe else 0.25,
                     help="random erasing probability with --build_timm_transform "
                          f"(default: {0.0 if linear_probe else 0.25})")
    aug.add_argument("--remode", type=str, default="pixel", help="random erasing mode (default: pixel)")
    aug.add_argument("--recount", type=int, default=1, help="random erasing count (default: 1)")
    aug.add_argument("--mixup", type=float, default=0.0, help="mixup alpha, > 0 enables it (default: 0)")
    aug.add_argument("--cutmix", type=float, default=0.0, help="cutmix alpha, > 0 enables it (default: 0)")
    aug.add_argument("--cutmix_minmax", type=float, nargs=2, default=None,
                     help="cutmix min/max box ratio, overrides alpha (default: off)")
    aug.add_argument("--mixup_prob", type=float, default=1.0,
                     help="probability of mixup or cutmix on a batch (default: 1.0)")
    aug.add_argument("--mixup_switch_prob", type=float, default=0.5,
                     help="probability of cutmix instead of mixup when both are on (default: 0.5)")
    aug.add_argument("--mixup_mode", type=str, default="batch", choices=["batch", "pair", "elem"],
                     help="mixup parameters per batch, pair or element (default: batch)")
    aug.add_argument("--smoothing", type=float, default=0.0,
                     help="label smoothing of the multi-label targets: y * (1 - s) + s / 2 (default: 0)")
    aug.add_argument("--color_jitter", type=float, default=None, metavar="PCT",
                     help="colour jitter with --build_timm_transform when --aa is none (timm applies it only "
                          "without RandAugment); MAE's flag (default: none, as MAE passes it)")
    aug.add_argument("--repeated-aug", "--repeated_aug", action="store_true", dest="repeated_aug",
                     help="the reference's flag, not supported for fine-tuning: refused with the reason "
                          "(default: off)")
    aug.add_argument("--ThreeAugment", action="store_true",
                     help="the reference's DeiT flag, not supported: refused with the reason (default: off)")
    aug.add_argument("--dist_eval", action="store_true",
                     help="accepted for the reference's commands and moot: predictions are always gathered from "
                          "every rank, no image scored twice (default: off)")
    # The reference's parsers have these too; its published commands leave them at their defaults. Each is
    # accepted at its default (which is what this project does) and refused otherwise, with what to use instead.
    ref = parser.add_argument_group("The reference's other flags (accepted at their defaults)")
    ref.add_argument("--optimizer", type=str, default=None,
                     help="accepted as the optimizer this script uses (adamw for fine-tuning, lars for the probe); "
                          "another is refused (default: the script's own)")
    ref.add_argument("--loss_func", type=str, default=None,
                     help="the reference's loss switch; the loss follows the task here: bce (multi-label, one-logit "
                          "NODE21) or ce (single-label, two-logit NODE21) is accepted where it is the task's, another "
                          "is refused (default: none)")
    ref.add_argument("--aug_strategy", type=str, default="default",
                     help="the reference's augmentation switch; only 'default' is accepted: augmentation is set by "
                          "--build_timm_transform, --aa, --reprob, --mixup, --cutmix (default: default)")
    ref.add_argument("--src", action="store_true",
                     help="the reference's flag, not supported: refused with the reason (default: off)")
    ref.add_argument("--resplit", action="store_true",
                     help="the reference's re-splitting switch, not supported: splits come from --train_list/"
                          "--val_list/--test_list and --label_fraction, refused with the reason (default: off)")

    add_protocol_args(parser, "mean validation AUROC", "test AUROC")


def add_protocol_args(parser: argparse.ArgumentParser, selected_by: str, scored: str) -> None:
    """How a downstream task selects on validation and scores its test list once (classification, segmentation)."""
    protocol = parser.add_argument_group("Evaluation protocol")
    protocol.add_argument("--eval_interval", type=int, default=1,
                          help=f"score the validation list every N epochs and at the last; the best {selected_by} "
                               "selects the checkpoint (default: 1)")
    protocol.add_argument("--patience", type=int, default=0,
                          help="stop after N validation scores without improvement; 0 never stops early "
                               "(default: 0)")
    protocol.add_argument("--bootstrap", type=int, default=1000,
                          help=f"patient-level bootstrap resamples for the {scored}'s 95%% confidence intervals; "
                               "0 skips them (default: 1000)")
    protocol.add_argument("--eval", action="store_true",
                          help="only score the test list with the --resume checkpoint and write results.json "
                               "(default: off)")
