"""The reference augmentation (RandomResizedCrop, flip, ToTensor, Normalize) and the mean/std table."""
import json
import os

import numpy as np
import torch
from torchvision import transforms
from torchvision.transforms import InterpolationMode

IMAGENET = ([0.485, 0.456, 0.406], [0.229, 0.224, 0.225])
CXR = ([0.5056] * 3, [0.252] * 3)

# The reference normalises each source with its own statistics: ImageNet for CheXpert and MIMIC,
# chest X-ray statistics for NIH. New sources default to the chest X-ray values.
DATASET_STATS = {"chexpert": IMAGENET, "chestxray_nih": CXR, "mimic_cxr": IMAGENET}
NORM_POLICIES = ("dataset", "imagenet", "cxr")


def norm_stats_for(source: str, policy: str, in_chans: int) -> tuple[list[float], list[float]]:
    """mean, std for one source under --norm_stats: dataset | imagenet | cxr | MEAN,STD | a JSON file."""
    if policy == "dataset":
        mean, std = DATASET_STATS.get(source, CXR)
    elif policy == "imagenet":
        mean, std = IMAGENET
    elif policy == "cxr":
        mean, std = CXR
    elif os.path.isfile(policy):
        with open(policy, encoding="utf-8") as f:
            stats = json.load(f)
        mean, std = [stats["mean"]] * 3, [stats["std"]] * 3
    else:
        mean_s, std_s = policy.split(",")
        mean, std = [float(mean_s)] * 3, [float(std_s)] * 3
    if in_chans == 1:
        # one gray channel: the mean of the per-channel statistics stands for all three
        return [sum(mean) / 3], [sum(std) / 3]
    return list(mean), list(std)


def check_norm_policy(policy: str) -> str | None:
    """None if --norm_stats is usable, else the problem."""
    if policy in NORM_POLICIES or os.path.isfile(policy):
        return None
    parts = policy.split(",")
    if len(parts) == 2 and all(_is_number(p) for p in parts) and float(parts[1]) > 0:
        return None
    return (f"--norm_stats must be one of {list(NORM_POLICIES)}, 'MEAN,STD' or a JSON file from "
            f"tools/compute_norm_stats.py; got '{policy}'")


class GrayToNormalizedTensor:
    """Gray PIL image -> normalised [C, H, W] float tensor in one broadcast op.

    Equals ToTensor (x / 255), repeating the plane C times (what convert('RGB') did), then
    Normalize(mean, std), to float rounding: (x / 255 - m) / s is computed as x * (1 / (255 s)) - m / s.
    """

    def __init__(self, mean, std, in_chans: int):
        if len(mean) != in_chans or len(std) != in_chans:
            raise ValueError(f"need {in_chans} mean/std values, got {len(mean)}/{len(std)}")
        self.mean, self.std = list(mean), list(std)
        self.scale = torch.tensor([1.0 / (255.0 * s) for s in std]).view(-1, 1, 1)
        self.shift = torch.tensor([-m / s for m, s in zip(mean, std)]).view(-1, 1, 1)

    def __call__(self, image) -> torch.Tensor:
        pixels = torch.from_numpy(np.asarray(image, dtype=np.uint8).copy()).unsqueeze(0)  # [1, H, W]
        return torch.addcmul(self.shift, pixels.float(), self.scale)  # broadcasts to [C, H, W]


def plain_resize(input_size: int) -> transforms.Resize:
    """The reference's resize without --random_resize_range: transforms.Resize((s, s)) at torchvision's default
    interpolation, bilinear (antialiased on PIL images)."""
    return transforms.Resize((input_size, input_size), interpolation=InterpolationMode.BILINEAR)


def build_train_transform(input_size: int, random_resize_range, mean, std, in_chans: int = 3):
    """The reference pipeline, on the gray image; channels are replicated after ToTensor."""
    if random_resize_range:
        geometry = [transforms.RandomResizedCrop(input_size, scale=tuple(random_resize_range),
                                                 interpolation=InterpolationMode.BICUBIC),
                    transforms.RandomHorizontalFlip()]
    else:
        geometry = [plain_resize(input_size), transforms.RandomHorizontalFlip()]
    return transforms.Compose([*geometry, GrayToNormalizedTensor(mean, std, in_chans)])


def build_eval_transform(input_size: int, mean, std, in_chans: int = 3):
    """Deterministic resize + normalise, for held-out reconstructions and the probe: the plain training resize."""
    return transforms.Compose([plain_resize(input_size), GrayToNormalizedTensor(mean, std, in_chans)])


def build_finetune_transform(is_train: bool, input_size: int, mean, std, in_chans: int, timm_transform: bool,
                             aa: str | None = None, reprob: float = 0.0, remode: str = "pixel", recount: int = 1,
                             color_jitter: float | None = None):
    """Fine-tuning pipeline on the gray image. --build_timm_transform: timm's create_transform (RandomResizedCrop,
    flip, RandAugment --aa, random erasing --reprob; eval: resize to input/0.875 and centre crop) on the image as
    RGB, the first channel kept for in_chans 1. Otherwise the reference's own fine-tuning transforms
    (reference_finetune_transform)."""
    if not timm_transform:
        return reference_finetune_transform(is_train, input_size, mean, std, in_chans)
    from timm.data import create_transform

    if in_chans == 1:  # timm's RandAugment and erasing work on RGB: the gray value stands in all three channels
        mean, std = list(mean) * 3, list(std) * 3
    # color_jitter passed as given (None: none), as MAE passes its flag; timm's own default would be 0.4
    timm_tf = create_transform(input_size, is_training=is_train, auto_augment=aa if is_train else None,
                               interpolation="bicubic", re_prob=reprob if is_train else 0.0, re_mode=remode,
                               re_count=recount, mean=tuple(mean), std=tuple(std), color_jitter=color_jitter)
    steps = [transforms.Lambda(_to_rgb), timm_tf]
    if in_chans == 1:
        steps.append(transforms.Lambda(_first_channel))
    return transforms.Compose(steps)


def reference_finetune_transform(is_train: bool, input_size: int, mean, std, in_chans: int = 3):
    """The reference's fine-tuning transforms without --build_timm_transform, at torchvision's defaults (bilinear):
    training RandomResizedCrop(input_size) (scale 0.08-1, aspect 3/4-4/3), horizontal flip, RandomRotation(7);
    evaluation Resize(input_size * 256 / 224) of the shorter side, then CenterCrop(input_size) (224: 256 then 224).
    On the gray image, the channels replicated after ToTensor (which equals converting to RGB first)."""
    if is_train:
        geometry = [transforms.RandomResizedCrop(input_size), transforms.RandomHorizontalFlip(),
                    transforms.RandomRotation(7)]
    else:
        geometry = [transforms.Resize(input_size * 256 // 224), transforms.CenterCrop(input_size)]
    return transforms.Compose([*geometry, GrayToNormalizedTensor(mean, std, in_chans)])


def _to_rgb(image):
    return image.convert("RGB")


def _first_channel(tensor: torch.Tensor) -> torch.Tensor:
    return tensor[:1]


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True
