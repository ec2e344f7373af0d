"""Evaluation on fixed images during pre-training: the reconstruction grid with val_loss, and the linear probe.

Both run on rank 0 with the model in eval mode and put it back as it was; the probe's encoder stays frozen.
"""
import contextlib

import torch

from util.precision import autocast
from util.probe import linear_probe_auroc
from util.vis import save_reconstruction_png

MASK_SEED = 1234  # the monitor's fixed mask, so grids and val_loss of different epochs compare


@contextlib.contextmanager
def evaluating(model: torch.nn.Module):
    was_training = model.training
    model.eval()
    try:
        yield model
    finally:
        model.train(was_training)


def reconstruction(model, images: torch.Tensor, mean, std, mask_ratio: float, path: str, title: str,
                   precision: str, device: torch.device):
    """Write the reconstruction grid to `path`; (val_loss, grid image)."""
    with evaluating(model), autocast(precision, device):
        return save_reconstruction_png(path, model, images.to(device), mask_ratio, MASK_SEED, mean, std, title)


@torch.no_grad()
def probe_auroc(model, train: tuple, test: tuple, precision: str, device: torch.device) -> tuple[float | None, int]:
    """(mean AUROC over findings, findings scored) of a logistic probe on the frozen features."""
    def features(images):
        with autocast(precision, device):
            return torch.cat([model.probe_features(b.to(device)).float().cpu() for b in images.split(64)])

    with evaluating(model):
        train_f, test_f = features(train[0]), features(test[0])
    with torch.enable_grad():  # the probe itself is trained
        return linear_probe_auroc(train_f, train[1], test_f, test[1])
