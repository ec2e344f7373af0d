"""The one contract between a pre-training model and everything around it (engine, monitor, tools).

Both families implement it: MaskedAutoencoderViT (models_mae.py) and MaskedAutoencoderCNN (models_mae_cnn.py). A new
family implements these members and its entry script passes a factory to engine_pretrain.PretrainTask; nothing
else needs to know its type.
"""
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

import torch


@dataclass
class EncoderExport:
    """An encoder in a downstream library's format, loaded strictly into that library's module."""

    state_dict: dict  # what is written to <out>.pth
    meta: dict  # sidecar fields naming the target: format, and the timm/torchvision name and keywords
    input_size: int
    in_chans: int
    target_features: Callable[[torch.Tensor], torch.Tensor]  # the loaded target module's features
    reference_features: Callable[[torch.Tensor], torch.Tensor] | None  # this model's; None if resampled


@runtime_checkable
class PretrainModel(Protocol):
    patch_size: int  # masking patch size in pixels
    in_chans: int
    norm_pix_loss: bool
    mask_ratio: float

    def forward(self, imgs: torch.Tensor, mask_ratio: float | None = None):
        """(loss, pred, mask): the reference's return. mask [N, L] is 1 on removed patches; pred is the ViT's
        patches [N, L, p*p*C] or the CNN's image [N, C, H, W]."""

    def probe_features(self, x: torch.Tensor) -> torch.Tensor:
        """[N, D] frozen features for the linear probe."""

    def export_encoder(self, input_size: int | None = None, in_chans: int | None = None) -> EncoderExport:
        """The encoder for fine-tuning; ValueError if this family cannot change input_size/in_chans."""

    def load_pretrained(self, checkpoint: dict) -> dict:
        """--init_from: load what fits; {'loaded', 'adapted', 'missing', 'ignored'} key lists."""


@dataclass
class Classifier:
    """What a fine-tuning entry script hands engine_finetune: the network and how to fill it from a checkpoint."""

    model: torch.nn.Module  # images [N, C, H, W] -> logits [N, K]
    head: torch.nn.Module  # the classifier (all that trains in a linear probe)
    load_pretrained: Callable[[dict], dict]  # checkpoint -> {'loaded', 'adapted', 'missing', 'ignored'} key lists
    layer_decay: bool  # timm's layer-wise LR decay applies (ViTs)


@dataclass
class Segmenter:
    """What the segmentation entry script hands engine_segment: the network and how to fill and optimise it."""

    model: torch.nn.Module  # images [N, C, H, W] -> mask logits [N, 1, H, W]
    load_pretrained: Callable[[dict, str], dict]  # (checkpoint, --decoder_init) -> {'loaded', 'adapted', 'new', ...}
    param_groups: Callable[[float], list[dict]]  # weight decay -> AdamW parameter groups
