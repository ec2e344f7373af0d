"""ViT classifiers for fine-tuning and linear probing (MAE's models_vit, on timm's VisionTransformer).

Fine-tuning uses global average pooling of the patch tokens, a LayerNorm (fc_norm) and a linear head, as MAE does;
--cls_token takes the class token through the final norm instead. Drop path (--drop_path) is timm's stochastic depth.
A linear probe (linear_probe=True) freezes everything but the head, which gets MAE's BatchNorm without affine
parameters in front, on the class token by default.

load_pretrained takes any ViT encoder this project or the reference writes: a whole MAE pre-training checkpoint
(its decoder and mask token are dropped), a tools/export_encoder.py output (timm names), the reference's published
ViT checkpoints (MAE format), and timm ImageNet weights saved to a local file (the 1000-class head is dropped).
Position embeddings are resampled to --input_size, the patch embedding adapted to --in_chans.
"""
import torch
from timm.layers import trunc_normal_
from timm.models.vision_transformer import VisionTransformer

from util.pos_embed import resample_pos_embed
from util.registry import Registry
from util.state_dict import adapt_in_chans, load_matching, require_complete, strip_prefixes

MODELS = Registry("ViT classifier")
NEW_KEYS = ("head.", "fc_norm.")  # what a pre-trained encoder cannot hold: the classifier and GAP's norm
DROPPED_PREFIXES = ("decoder_", "mask_token", "head.")  # MAE's decoder, and any earlier classifier


def _vit(embed_dim: int, depth: int, num_heads: int, patch_size: int = 16, mlp_ratio: float = 4.0,
         global_pool: str = "avg", linear_probe: bool = False, **kwargs) -> VisionTransformer:
    model = VisionTransformer(patch_size=patch_size, embed_dim=embed_dim, depth=depth, num_heads=num_heads,
                              mlp_ratio=mlp_ratio, qkv_bias=True, global_pool=global_pool, **kwargs)
    trunc_normal_(model.head.weight, std=0.01 if linear_probe else 2e-5)  # MAE's head initialisation
    if linear_probe:
        model.head = torch.nn.Sequential(torch.nn.BatchNorm1d(embed_dim, affine=False, eps=1e-6), model.head)
        for name, param in model.named_parameters():
            param.requires_grad = name.startswith("head.")
    return model


@MODELS.register(patch_size=16)
def vit_small_patch16(**kwargs):
    return _vit(384, 12, 6, **kwargs)


@MODELS.register(patch_size=16)
def vit_base_patch16(**kwargs):
    return _vit(768, 12, 12, **kwargs)


@MODELS.register(patch_size=16)
def vit_large_patch16(**kwargs):
    return _vit(1024, 24, 16, **kwargs)


@MODELS.register(patch_size=14)
def vit_huge_patch14(**kwargs):
    return _vit(1280, 32, 16, patch_size=14, **kwargs)


@MODELS.register(patch_size=16)
def vit_debug_patch16(**kwargs):
    """Not a reference model: the encoder of models_mae.mae_vit_debug_patch16 (2 blocks, 64 wide), for tests."""
    return _vit(64, 2, 4, mlp_ratio=2, **kwargs)


def create_model(name: str, num_classes: int, img_size: int, in_chans: int = 3, drop_path: float = 0.0,
                 drop_rate: float = 0.0, global_pool: bool = True, linear_probe: bool = False) -> VisionTransformer:
    return MODELS.get(name)(num_classes=num_classes, img_size=img_size, in_chans=in_chans, drop_path_rate=drop_path,
                            drop_rate=drop_rate, global_pool="avg" if global_pool else "token",
                            linear_probe=linear_probe)


def load_pretrained(model: VisionTransformer, checkpoint: dict, flag: str = "--finetune") -> dict:
    """Load a pre-trained ViT encoder; {'loaded', 'adapted', 'missing', 'ignored'} key lists.

    Strict for the encoder: every model tensor but the head (and fc_norm under global pooling) must come from the
    checkpoint."""
    state = strip_prefixes(checkpoint)

    def resolve(key, target):
        if key.startswith(DROPPED_PREFIXES):
            return None
        return key if key in target else None

    def adapt(key, value, wanted):
        if key == "pos_embed" and value.shape != wanted.shape:
            grid = model.patch_embed.grid_size
            return resample_pos_embed(value, grid), f"resampled {tuple(value.shape)} -> {tuple(wanted.shape)}"
        if key == "patch_embed.proj.weight" and value.shape[1] != wanted.shape[1]:
            return adapt_in_chans(value, wanted.shape[1]), f"channels {value.shape[1]} -> {wanted.shape[1]}"
        return value, None

    return require_complete(load_matching(model, state, resolve, adapt, flag=flag), NEW_KEYS, flag,
                            "encoder tensor(s) of this model")
