"""Learning-rate schedule of the reference: linear warmup, then a half-cycle cosine (or constant)."""
import math


def lr_at(epoch: float, lr: float, min_lr: float, warmup_epochs: float, epochs: float, fixed_lr: bool = False) -> float:
    """The LR at a fractional epoch (data_iter_step / len(loader) + epoch), as in MAE's lr_sched."""
    if epoch < warmup_epochs:
        return lr * epoch / warmup_epochs
    if fixed_lr:
        return lr
    progress = (epoch - warmup_epochs) / max(epochs - warmup_epochs, 1e-12)
    return min_lr + (lr - min_lr) * 0.5 * (1.0 + math.cos(math.pi * progress))


def adjust_learning_rate(optimizer, epoch: float, args) -> float:
    """Set the LR of every param group for this fractional epoch; returns it."""
    lr = lr_at(epoch, args.lr, args.min_lr, args.warmup_epochs, args.epochs, args.fixed_lr)
    for group in optimizer.param_groups:
        group["lr"] = lr * group.get("lr_scale", 1.0)
    return lr
