"""CNN classifiers for fine-tuning and linear probing: torchvision's DenseNet and ResNet definitions.

load_pretrained takes what the CNN pre-training writes or the reference published:
  - an SMP encoder state dict (--checkpoint_type smp_encoder, the reference's densenet121_CXR_0.3M_mae.pth): SMP
    builds these encoders from torchvision's modules, so the keys are torchvision's;
  - a whole U-Net pre-training checkpoint of this project (model.encoder.* is taken, the decoder dropped);
  - a tools/export_encoder.py output (DenseNet `.features` keys, ResNet without `fc`);
  - torchvision ImageNet weights saved to a local file (the 1000-class classifier is dropped).
Every backbone tensor must be loaded (strict); only the classifier starts fresh. --in_chans 1 sums the first
convolution's kernel over RGB, as the pre-training's --init_from does.
"""
import re

import torch
import torchvision

from util.registry import Registry
from util.state_dict import adapt_in_chans, load_matching, require_complete, strip_prefixes

MODELS = Registry("CNN classifier")
# torchvision's DenseNet checkpoints before 0.3 named 'norm.1' what is now 'norm1' (torchvision's own fix-up)
_OLD_DENSENET_KEY = re.compile(r"^(.*denselayer\d+\.(?:norm|relu|conv))\.((?:[12])\.(?:weight|bias|running_mean|"
                               r"running_var))$")


def _register(name: str, head: str, stem: str):
    @MODELS.register(name=name, head=head, stem=stem)
    def factory(**kwargs):
        return getattr(torchvision.models, name)(weights=None, **kwargs)

    return factory


for _name in ("densenet121", "densenet161", "densenet169", "densenet201"):
    _register(_name, head="classifier", stem="features.conv0")
for _name in ("resnet18", "resnet34", "resnet50", "resnet101", "resnet152", "resnext50_32x4d", "resnext101_32x8d"):
    _register(_name, head="fc", stem="conv1")


def head_name(model_name: str) -> str:
    return MODELS.config(model_name)["head"]


def create_model(name: str, num_classes: int, in_chans: int = 3, drop_rate: float = 0.0,
                 linear_probe: bool = False) -> torch.nn.Module:
    config = MODELS.config(name)
    kwargs = {"drop_rate": drop_rate} if name.startswith("densenet") else {}
    if drop_rate and not kwargs:
        raise ValueError(f"--vit_dropout_rate applies to ViTs and DenseNets; {name} has no dropout")
    model = MODELS.get(name)(num_classes=num_classes, **kwargs)
    if in_chans != 3:
        parent_name, _, attr = config["stem"].rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        old = getattr(parent, attr)
        setattr(parent, attr, torch.nn.Conv2d(in_chans, old.out_channels, old.kernel_size, old.stride, old.padding,
                                              bias=old.bias is not None))
    if linear_probe:  # MAE's probe head: BatchNorm without affine parameters, then the linear layer
        head = getattr(model, config["head"])
        torch.nn.init.trunc_normal_(head.weight, std=0.01)
        setattr(model, config["head"], torch.nn.Sequential(
            torch.nn.BatchNorm1d(head.in_features, affine=False, eps=1e-6), head))
        for pname, param in model.named_parameters():
            param.requires_grad = pname.startswith(config["head"] + ".")
    model.medmae_name = name
    # channels_last, as the U-Net pre-training runs: oneDNN and cuDNN run NHWC convolutions faster. The weights are
    # stored so, and the pre-hook hands the first convolution an NHWC batch; state-dict keys and values are unchanged
    model.to(memory_format=torch.channels_last)
    model.register_forward_pre_hook(_to_channels_last)
    return model


def _to_channels_last(module, inputs):
    return (inputs[0].contiguous(memory_format=torch.channels_last), *inputs[1:])


def load_pretrained(model: torch.nn.Module, checkpoint: dict, flag: str = "--finetune") -> dict:
    """Load a pre-trained backbone; {'loaded', 'adapted', 'missing', 'ignored'} key lists (see the module doc)."""
    config = MODELS.config(model.medmae_name)
    # a U-Net checkpoint's model.encoder.* loses both prefixes here; its decoder keys then match nothing
    state = {_OLD_DENSENET_KEY.sub(r"\1\2", k): v for k, v in strip_prefixes(checkpoint).items()}
    head = config["head"] + "."
    stem = config["stem"] + ".weight"

    def resolve(key, target):
        if key.startswith(head):
            return None
        for candidate in (key, f"features.{key}"):  # DenseNet exports hold `.features` alone
            if candidate in target:
                return candidate
        return None

    def adapt(key, value, wanted):
        if key == stem and value.shape[1] != wanted.shape[1]:
            return adapt_in_chans(value, wanted.shape[1]), f"channels {value.shape[1]} -> {wanted.shape[1]}"
        return value, None

    return require_complete(load_matching(model, state, resolve, adapt, flag=flag), (head,), flag,
                            f"backbone tensor(s) of {model.medmae_name}")
