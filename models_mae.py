"""Masked autoencoder with a ViT backbone (He et al. 2021), as used by medical_mae.

State-dict keys and shapes match the reference (and facebookresearch/mae) exactly, so checkpoints
move both ways. Built on timm >= 1.0 blocks, which use PyTorch's fused SDPA attention.
"""
import math
from functools import partial

import torch
import torch.nn as nn
from timm.layers import PatchEmbed
from timm.models.vision_transformer import Block

from util.masking import (
    binary_mask,
    check_mask_ratio,
    normalize_patch_targets,
    patchify,
    random_masking_ids,
    unpatchify,
)
from util.model_api import EncoderExport
from util.pos_embed import get_2d_sincos_pos_embed, resample_pos_embed
from util.registry import Registry
from util.state_dict import adapt_in_chans, load_matching, strip_prefixes

MODELS = Registry("ViT MAE model")


class MaskedAutoencoderViT(nn.Module):
    """Masked autoencoder with a VisionTransformer encoder and a narrow transformer decoder."""

    def __init__(self, img_size=224, patch_size=16, in_chans=3, embed_dim=1024, depth=24, num_heads=16,
                 decoder_embed_dim=512, decoder_depth=8, decoder_num_heads=16, mlp_ratio=4.0,
                 norm_layer=partial(nn.LayerNorm, eps=1e-6), norm_pix_loss=False, mask_ratio=0.75):
        super().__init__()
        if img_size % patch_size:
            raise ValueError(f"input_size {img_size} must be divisible by the patch size {patch_size}")
        check_mask_ratio(mask_ratio)
        self.in_chans = in_chans
        self.patch_size = patch_size
        self.mask_ratio = mask_ratio
        self.norm_pix_loss = norm_pix_loss
        self.timm_model = None  # timm architecture name of this encoder; create_model sets it from the registry entry

        # encoder
        self.patch_embed = PatchEmbed(img_size, patch_size, in_chans, embed_dim)
        num_patches = self.patch_embed.num_patches
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        # fixed sin-cos table; a Parameter without grad keeps the reference's state_dict key
        self.pos_embed = nn.Parameter(torch.zeros(1, num_patches + 1, embed_dim), requires_grad=False)
        self.blocks = nn.ModuleList([
            Block(embed_dim, num_heads, mlp_ratio, qkv_bias=True, norm_layer=norm_layer) for _ in range(depth)
        ])
        self.norm = norm_layer(embed_dim)

        # decoder
        self.decoder_embed = nn.Linear(embed_dim, decoder_embed_dim, bias=True)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, decoder_embed_dim))
        self.decoder_pos_embed = nn.Parameter(torch.zeros(1, num_patches + 1, decoder_embed_dim), requires_grad=False)
        self.decoder_blocks = nn.ModuleList([
            Block(decoder_embed_dim, decoder_num_heads, mlp_ratio, qkv_bias=True, norm_layer=norm_layer)
            for _ in range(decoder_depth)
        ])
        self.decoder_norm = norm_layer(decoder_embed_dim)
        self.decoder_pred = nn.Linear(decoder_embed_dim, patch_size**2 * in_chans, bias=True)
        self.initialize_weights()

    def initialize_weights(self):
        grid = self.patch_embed.grid_size
        pos = get_2d_sincos_pos_embed(self.pos_embed.shape[-1], grid, cls_token=True)
        self.pos_embed.data.copy_(torch.from_numpy(pos).float().unsqueeze(0))
        dec_pos = get_2d_sincos_pos_embed(self.decoder_pos_embed.shape[-1], grid, cls_token=True)
        self.decoder_pos_embed.data.copy_(torch.from_numpy(dec_pos).float().unsqueeze(0))
        # patch_embed is initialised like nn.Linear, not nn.Conv2d (MAE)
        w = self.patch_embed.proj.weight.data
        torch.nn.init.xavier_uniform_(w.view([w.shape[0], -1]))
        torch.nn.init.normal_(self.cls_token, std=0.02)
        torch.nn.init.normal_(self.mask_token, std=0.02)
        self.apply(self._init_weights)

    @staticmethod
    def _init_weights(m):
        if isinstance(m, nn.Linear):
            torch.nn.init.xavier_uniform_(m.weight)
            if m.bias is not None:
                nn.init.constant_(m.bias, 0)
        elif isinstance(m, nn.LayerNorm):
            nn.init.constant_(m.bias, 0)
            nn.init.constant_(m.weight, 1.0)

    def patchify(self, imgs):
        """[N, C, H, W] -> [N, L, p*p*C]"""
        return patchify(imgs, self.patch_size)

    def unpatchify(self, x):
        """[N, L, p*p*C] -> [N, C, H, W]"""
        return unpatchify(x, self.patch_size, self.in_chans, self.patch_embed.grid_size)

    def random_masking(self, x, mask_ratio):
        """Keep int(L*(1-mask_ratio)) tokens per sample. x: [N, L, D] -> [N, len_keep, D], mask [N, L]."""
        n, num_patches, dim = x.shape
        ids_shuffle, ids_restore, len_keep = random_masking_ids(n, num_patches, mask_ratio, x.device)
        ids_keep = ids_shuffle[:, :len_keep]
        x_masked = torch.gather(x, dim=1, index=ids_keep.unsqueeze(-1).repeat(1, 1, dim))
        return x_masked, binary_mask(ids_restore, len_keep), ids_restore

    def forward_encoder(self, x, mask_ratio):
        x = self.patch_embed(x)  # [N, L, D]
        x = x + self.pos_embed[:, 1:, :]
        x, mask, ids_restore = self.random_masking(x, mask_ratio)
        cls_token = self.cls_token + self.pos_embed[:, :1, :]
        x = torch.cat((cls_token.expand(x.shape[0], -1, -1), x), dim=1)  # [N, 1 + len_keep, D]
        for blk in self.blocks:
            x = blk(x)
        return self.norm(x), mask, ids_restore

    def forward_features(self, x):
        """Unmasked encoder output [N, 1 + L, D], deterministic: for probes and downstream use."""
        x = self.patch_embed(x) + self.pos_embed[:, 1:, :]
        cls_token = self.cls_token + self.pos_embed[:, :1, :]
        x = torch.cat((cls_token.expand(x.shape[0], -1, -1), x), dim=1)
        for blk in self.blocks:
            x = blk(x)
        return self.norm(x)

    def probe_features(self, x):
        """[N, D]: mean of the unmasked patch tokens, for the linear probe."""
        return self.forward_features(x)[:, 1:, :].mean(dim=1)

    def forward_decoder(self, x, ids_restore):
        x = self.decoder_embed(x)  # [N, 1 + len_keep, Dd]
        num_masked = ids_restore.shape[1] + 1 - x.shape[1]
        mask_tokens = self.mask_token.repeat(x.shape[0], num_masked, 1)
        x_ = torch.cat([x[:, 1:, :], mask_tokens], dim=1)  # no cls token
        x_ = torch.gather(x_, dim=1, index=ids_restore.unsqueeze(-1).repeat(1, 1, x.shape[2]))  # unshuffle
        x = torch.cat([x[:, :1, :], x_], dim=1) + self.decoder_pos_embed
        for blk in self.decoder_blocks:
            x = blk(x)
        x = self.decoder_pred(self.decoder_norm(x))  # [N, 1 + L, p*p*C]
        return x[:, 1:, :]

    def forward_loss(self, imgs, pred, mask):
        """Per-patch MSE averaged over the removed patches, computed in fp32."""
        target = self.patchify(imgs).float()
        if self.norm_pix_loss:
            target = normalize_patch_targets(target)
        loss = ((pred.float() - target) ** 2).mean(dim=-1)  # [N, L]
        return (loss * mask).sum() / mask.sum()

    def forward(self, imgs, mask_ratio=None):
        mask_ratio = self.mask_ratio if mask_ratio is None else mask_ratio
        check_mask_ratio(mask_ratio)
        latent, mask, ids_restore = self.forward_encoder(imgs, mask_ratio)
        pred = self.forward_decoder(latent, ids_restore)
        return self.forward_loss(imgs, pred, mask), pred, mask

    def encoder_state_dict(self) -> dict:
        """Encoder weights under timm VisionTransformer names (the decoder and mask token dropped)."""
        return to_timm_state_dict(self.state_dict())

    def export_encoder(self, input_size: int | None = None, in_chans: int | None = None) -> EncoderExport:
        return export_to_timm(self, input_size, in_chans)

    def load_pretrained(self, checkpoint: dict) -> dict:
        return load_pretrained(self, checkpoint)


def create_model(name: str, **kwargs) -> MaskedAutoencoderViT:
    model = MODELS.get(name)(**kwargs)
    model.timm_model = MODELS.config(name)["timm_model"]
    return model


def _vit(embed_dim, depth, num_heads, decoder_embed_dim, decoder_depth, **kwargs):
    kwargs.setdefault("patch_size", 16)
    return MaskedAutoencoderViT(embed_dim=embed_dim, depth=depth, num_heads=num_heads,
                                decoder_embed_dim=decoder_embed_dim, decoder_depth=decoder_depth,
                                decoder_num_heads=16, mlp_ratio=4, **kwargs)


# Each entry carries its config: patch size, native input size (fixed: the model is defined at that size), and the
# timm VisionTransformer its encoder exports to (None: timm has no named model of that shape).
VIT_S, VIT_B, VIT_L, VIT_H = (dict(patch_size=16, input_size=224, timm_model="vit_small_patch16_224"),
                              dict(patch_size=16, input_size=224, timm_model="vit_base_patch16_224"),
                              dict(patch_size=16, input_size=224, timm_model="vit_large_patch16_224"),
                              dict(patch_size=14, input_size=224, timm_model="vit_huge_patch14_224"))


@MODELS.register(**VIT_S)
def mae_vit_small_patch16_dec128d2b(**kwargs):
    return _vit(384, 12, 6, 128, 2, **kwargs)


@MODELS.register(**VIT_S)
def mae_vit_small_patch16_dec512d8b(**kwargs):
    return _vit(384, 12, 6, 512, 8, **kwargs)


@MODELS.register(**VIT_S)
def mae_vit_small_patch16_dec512d2b(**kwargs):
    return _vit(384, 12, 6, 512, 2, **kwargs)


@MODELS.register(**{**VIT_S, "input_size": 448, "fixed_input_size": True})
def mae_vit_small_patch16_dec512d2b_448(**kwargs):
    kwargs.setdefault("img_size", 448)
    return _vit(384, 12, 6, 512, 2, **kwargs)


@MODELS.register(**VIT_B)
def mae_vit_base_patch16_dec512d2b(**kwargs):
    return _vit(768, 12, 12, 512, 2, **kwargs)


@MODELS.register(**VIT_B)
def mae_vit_base_patch16_dec512d8b(**kwargs):
    return _vit(768, 12, 12, 512, 8, **kwargs)


@MODELS.register(**VIT_L)
def mae_vit_large_patch16_dec512d8b(**kwargs):
    return _vit(1024, 24, 16, 512, 8, **kwargs)


@MODELS.register(**VIT_H)
def mae_vit_huge_patch14_dec512d8b(**kwargs):
    kwargs.setdefault("patch_size", 14)
    return _vit(1280, 32, 16, 512, 8, **kwargs)


@MODELS.register(patch_size=16, input_size=224, timm_model=None)
def mae_vit_debug_patch16(**kwargs):
    """Not a reference model: a 2-block, 64-wide ViT for smoke tests and CI (checkpoints under 1 MB)."""
    kwargs.setdefault("patch_size", 16)
    return MaskedAutoencoderViT(embed_dim=64, depth=2, num_heads=4, decoder_embed_dim=32, decoder_depth=1,
                                decoder_num_heads=4, mlp_ratio=2, **kwargs)


# reference aliases: the recommended architectures under their short names. The reference points the short
# ViT-S name at the 128-wide, 2-block decoder, unlike facebookresearch/mae's 512-wide, 8-block default.
MODELS.register(mae_vit_small_patch16_dec512d8b, name="mae_vit_small_patch16_dec512d8")
MODELS.register(mae_vit_small_patch16_dec512d2b, name="mae_vit_small_patch16_dec512d2")
MODELS.register(mae_vit_small_patch16_dec128d2b, name="mae_vit_small_patch16")
MODELS.register(mae_vit_base_patch16_dec512d2b, name="mae_vit_base_patch16_dec512d2")
MODELS.register(mae_vit_base_patch16_dec512d8b, name="mae_vit_base_patch16")
MODELS.register(mae_vit_large_patch16_dec512d8b, name="mae_vit_large_patch16")
MODELS.register(mae_vit_huge_patch14_dec512d8b, name="mae_vit_huge_patch14")


# ---- conversions: export to timm, and --init_from --------------------------------------------------------------

def timm_config(model: MaskedAutoencoderViT) -> tuple[str | None, dict]:
    """(timm model name or None, keyword arguments) that build a VisionTransformer holding this encoder."""
    kwargs = {"img_size": model.patch_embed.img_size[0], "in_chans": model.in_chans, "num_classes": 0}
    if model.timm_model is None:  # no named timm model of this shape: its full description
        dim = model.cls_token.shape[-1]
        kwargs.update(embed_dim=dim, depth=len(model.blocks), num_heads=model.blocks[0].attn.num_heads,
                      mlp_ratio=model.blocks[0].mlp.fc1.out_features / dim, patch_size=model.patch_size)
    return model.timm_model, kwargs


def export_to_timm(model: MaskedAutoencoderViT, input_size: int | None, in_chans: int | None) -> EncoderExport:
    """The encoder as a timm VisionTransformer state dict (strict, no head); --input_size resamples the position
    table, --in_chans adapts the patch embedding."""
    import timm
    from timm.models.vision_transformer import VisionTransformer

    state = to_timm_state_dict(model.state_dict(), input_size, in_chans)
    name, kwargs = timm_config(model)
    kwargs.update(img_size=input_size or kwargs["img_size"], in_chans=in_chans or kwargs["in_chans"])
    target = timm.create_model(name, pretrained=False, **kwargs) if name else VisionTransformer(**kwargs)
    target.load_state_dict(state, strict=True)  # num_classes=0: no head, so every key must match
    same_input = input_size in (None, model.patch_embed.img_size[0]) and in_chans in (None, model.in_chans)
    meta = {"format": "timm", "timm_model": name, "timm_kwargs": kwargs}
    if name is None:
        meta["timm_class"] = "timm.models.vision_transformer.VisionTransformer"
    return EncoderExport(state, meta, kwargs["img_size"], kwargs["in_chans"], target.eval().forward_features,
                         model.forward_features if same_input else None)


def to_timm_state_dict(mae_state: dict, img_size: int | None = None, in_chans: int | None = None) -> dict:
    """Encoder weights under timm VisionTransformer names, optionally resampled to img_size and in_chans."""
    state = {k: v for k, v in mae_state.items() if not k.startswith(("decoder_", "mask_token"))}
    patch = state["patch_embed.proj.weight"].shape[-1]
    if img_size is not None:
        state["pos_embed"] = resample_pos_embed(state["pos_embed"], (img_size // patch, img_size // patch))
    if in_chans is not None:
        state["patch_embed.proj.weight"] = adapt_in_chans(state["patch_embed.proj.weight"], in_chans)
    return state


def to_hf_vit(timm_state: dict, num_heads: int) -> tuple[dict, dict]:
    """(config.json fields, state dict) of Hugging Face transformers' ViTModel holding this timm-named encoder.

    The query, key and value rows of timm's fused qkv projection become three layers; the layer norms keep timm's
    eps (1e-6). ViTModel's pooler (a dense layer and tanh on the class token) has no counterpart in MAE: it is
    written as the identity with a linear activation, so pooler_output is the class token after the final norm, as
    our encoder's. No transformers import: the folder is written as it expects it (config.json, model.safetensors)."""
    dim = timm_state["cls_token"].shape[-1]
    patch_weight = timm_state["patch_embed.proj.weight"]
    patch, in_chans = patch_weight.shape[-1], patch_weight.shape[1]
    grid = math.isqrt(timm_state["pos_embed"].shape[1] - 1)
    depth = 1 + max(int(k.split(".")[1]) for k in timm_state if k.startswith("blocks."))
    state = {"embeddings.cls_token": timm_state["cls_token"],
             "embeddings.position_embeddings": timm_state["pos_embed"],
             "embeddings.patch_embeddings.projection.weight": patch_weight,
             "embeddings.patch_embeddings.projection.bias": timm_state["patch_embed.proj.bias"],
             "layernorm.weight": timm_state["norm.weight"], "layernorm.bias": timm_state["norm.bias"],
             "pooler.dense.weight": torch.eye(dim), "pooler.dense.bias": torch.zeros(dim)}
    for i in range(depth):
        ours, theirs = f"blocks.{i}.", f"encoder.layer.{i}."
        for kind in ("weight", "bias"):
            query, key, value = timm_state[f"{ours}attn.qkv.{kind}"].chunk(3, dim=0)
            state.update({
                f"{theirs}attention.attention.query.{kind}": query, f"{theirs}attention.attention.key.{kind}": key,
                f"{theirs}attention.attention.value.{kind}": value,
                f"{theirs}attention.output.dense.{kind}": timm_state[f"{ours}attn.proj.{kind}"],
                f"{theirs}layernorm_before.{kind}": timm_state[f"{ours}norm1.{kind}"],
                f"{theirs}layernorm_after.{kind}": timm_state[f"{ours}norm2.{kind}"],
                f"{theirs}intermediate.dense.{kind}": timm_state[f"{ours}mlp.fc1.{kind}"],
                f"{theirs}output.dense.{kind}": timm_state[f"{ours}mlp.fc2.{kind}"]})
    config = {"architectures": ["ViTModel"], "model_type": "vit", "hidden_size": dim, "num_hidden_layers": depth,
              "num_attention_heads": num_heads, "intermediate_size": timm_state["blocks.0.mlp.fc1.weight"].shape[0],
              "hidden_act": "gelu", "layer_norm_eps": 1e-6, "image_size": grid * patch, "patch_size": patch,
              "num_channels": in_chans, "qkv_bias": True, "hidden_dropout_prob": 0.0,
              "attention_probs_dropout_prob": 0.0, "pooler_output_size": dim, "pooler_act": "linear",
              "encoder_stride": patch}
    return config, {k: v.contiguous() for k, v in state.items()}


def _adapt_pred_channels(value: torch.Tensor, source_chans: int, in_chans: int) -> torch.Tensor:
    """decoder_pred rows are ordered (p, q, c): average the channels (3 -> 1) or repeat them (1 -> 3)."""
    rows = value.reshape(-1, source_chans, *value.shape[1:])  # [p*p, C, (D)]
    if in_chans == 1:
        return rows.mean(dim=1).reshape(-1, *value.shape[1:])
    if source_chans == 1:
        return rows.repeat_interleave(in_chans, dim=1).reshape(-1, *value.shape[1:])
    raise ValueError(f"cannot adapt decoder_pred from {source_chans} to {in_chans} channels")


def load_pretrained(model: MaskedAutoencoderViT, checkpoint: dict) -> dict:
    """--init_from: load an encoder or a full MAE (e.g. ImageNet MAE) into `model`, adapting what can be adapted.

    Returns {'loaded', 'adapted', 'missing', 'ignored'}; raises on any other shape mismatch. Fixed sin-cos
    position tables of another grid are regenerated rather than resampled (they are a function of the grid).
    """
    def adapt(key, value, wanted):
        if key == "patch_embed.proj.weight" and value.shape[1] != wanted.shape[1]:
            return adapt_in_chans(value, wanted.shape[1]), f"channels {value.shape[1]} -> {wanted.shape[1]}"
        if key.startswith("decoder_pred.") and value.shape[0] != wanted.shape[0]:
            source_chans = value.shape[0] // model.patch_size**2
            return _adapt_pred_channels(value, source_chans, model.in_chans), f"output channels -> {model.in_chans}"
        if key in ("pos_embed", "decoder_pos_embed") and value.shape != wanted.shape:
            return None, f"regenerated for the {model.patch_embed.grid_size} grid"
        return value, None

    return load_matching(model, strip_prefixes(checkpoint), lambda key, target: key if key in target else None,
                         adapt, regenerated=("pos_embed", "decoder_pos_embed"))
