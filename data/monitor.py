"""Fixed images the engine evaluates on: the reconstruction monitor batch and the linear-probe subset.

Both are chosen once, deterministically, from what the sources offer (held-out-split images, findings labels), and
resized with the plain resize and the run's own per-source normalisation.
"""
import logging
import zlib
from dataclasses import dataclass

import numpy as np
import torch

from data.base import ConcatSources
from data.image_io import load_gray
from data.transforms import build_eval_transform

logger = logging.getLogger(__name__)

MONITOR_BATCH = 4


@dataclass
class MonitorBatch:
    images: torch.Tensor  # [N, C, H, W], normalised with `source`'s statistics
    source: str
    held_out: bool  # False: no source offered a held-out split, so these are training images


@dataclass
class ProbeSubset:
    source: str
    train: tuple[torch.Tensor, torch.Tensor]  # images, [N, K] 0/1 findings
    test: tuple[torch.Tensor, torch.Tensor]  # other patients


def monitor_batch(dataset: ConcatSources, per_source: dict, input_size: int, in_chans: int) -> MonitorBatch:
    """Held-out-split images of the first source that has them (never trained on), else the first pool images."""
    source = next((d for d in dataset.datasets if d.monitor_paths), None)
    if source is not None:
        images, held_out = [load_gray(p) for p in source.monitor_paths[:MONITOR_BATCH]], True
        logger.info("monitoring reconstructions on %d held-out images of %s", len(images), source.name)
    else:
        source, held_out = dataset.datasets[0], False
        images = [source.decode(i)[0] for i in range(min(MONITOR_BATCH, len(source)))]
        logger.info("no source has a held-out split here: monitoring reconstructions on %d training images of %s",
                    len(images), source.name)
    transform = build_eval_transform(input_size, *per_source[source.name], in_chans)
    return MonitorBatch(torch.stack([transform(image) for image in images]), source.name, held_out)


def probe_subset(dataset: ConcatSources, per_source: dict, input_size: int, in_chans: int,
                 size: int) -> ProbeSubset | None:
    """A fixed labelled subset of the first source with labels, split by patient into probe train and test."""
    source = next((d for d in dataset.datasets if d.labels is not None), None)
    if source is None:
        logger.warning("--probe_freq: no source here has findings labels (CheXpert, NIH with Data_Entry or a "
                       "labelled list); the probe is off")
        return None
    picks = np.sort(np.random.default_rng(0).choice(len(source), min(size, len(source)), replace=False))
    is_test = np.array([zlib.crc32(source.patients[i]) % 2 == 1 for i in picks])
    transform = build_eval_transform(input_size, *per_source[source.name], in_chans)
    images = torch.stack([transform(source.decode(int(i))[0]) for i in picks])
    labels = torch.from_numpy(source.labels[picks])
    logger.info("linear probe on %s: %d images (%d for scoring, other patients), %d findings", source.name,
                len(picks), int(is_test.sum()), labels.shape[1])
    return ProbeSubset(source.name, (images[~is_test], labels[~is_test]), (images[is_test], labels[is_test]))
