import pytest
import timm
import torch

import models_mae
from tests.reference_impl import reference_forward
from util.masking import patchify, unpatchify

# The reference's factories, (embed_dim, depth, heads, decoder_dim, decoder_depth) each, and its alias table
# one for one (alias -> factory). Every decoder has 16 heads.
REFERENCE_FACTORIES = {
    "mae_vit_small_patch16_dec128d2b": (384, 12, 6, 128, 2),
    "mae_vit_small_patch16_dec512d8b": (384, 12, 6, 512, 8),
    "mae_vit_small_patch16_dec512d2b": (384, 12, 6, 512, 2),
    "mae_vit_small_patch16_dec512d2b_448": (384, 12, 6, 512, 2),
    "mae_vit_base_patch16_dec512d2b": (768, 12, 12, 512, 2),
    "mae_vit_base_patch16_dec512d8b": (768, 12, 12, 512, 8),
    "mae_vit_large_patch16_dec512d8b": (1024, 24, 16, 512, 8),
    "mae_vit_huge_patch14_dec512d8b": (1280, 32, 16, 512, 8),
}
REFERENCE_ALIASES = {
    "mae_vit_small_patch16_dec512d8": "mae_vit_small_patch16_dec512d8b",
    "mae_vit_small_patch16_dec512d2": "mae_vit_small_patch16_dec512d2b",
    "mae_vit_small_patch16": "mae_vit_small_patch16_dec128d2b",
    "mae_vit_base_patch16_dec512d2": "mae_vit_base_patch16_dec512d2b",
    "mae_vit_base_patch16": "mae_vit_base_patch16_dec512d8b",
    "mae_vit_large_patch16": "mae_vit_large_patch16_dec512d8b",
    "mae_vit_huge_patch14": "mae_vit_huge_patch14_dec512d8b",
}
REFERENCE_NAMES = [*REFERENCE_FACTORIES, *REFERENCE_ALIASES]


def _expected(name):
    return REFERENCE_FACTORIES[REFERENCE_ALIASES.get(name, name)]


def test_models_mae_registry_is_the_reference_table_plus_the_debug_model():
    assert set(models_mae.MODELS.names()) == {*REFERENCE_NAMES, "mae_vit_debug_patch16"}
    for alias, target in REFERENCE_ALIASES.items():
        assert models_mae.MODELS.get(alias) is models_mae.MODELS.get(target), alias


# ViT-L and ViT-H take seconds each on CPU: the whole suite builds them, make test-fast the smaller ones
@pytest.mark.parametrize("name", [pytest.param(n, marks=pytest.mark.slow) if "large" in n or "huge" in n else n
                                  for n in REFERENCE_NAMES])
def test_models_mae_every_reference_name_builds_and_trains(name):
    patch = 14 if "patch14" in name else 16
    model = models_mae.create_model(name, img_size=2 * patch)
    embed, depth, heads, dec_dim, dec_depth = _expected(name)
    assert model.patch_embed.proj.out_channels == embed and len(model.blocks) == depth
    assert model.blocks[0].attn.num_heads == heads
    assert model.decoder_embed.out_features == dec_dim and len(model.decoder_blocks) == dec_depth
    assert all(b.attn.num_heads == 16 for b in model.decoder_blocks)
    loss, pred, mask = model(torch.randn(2, 3, 2 * patch, 2 * patch), mask_ratio=0.5)
    loss.backward()
    assert torch.isfinite(loss) and pred.shape == (2, 4, patch * patch * 3) and mask.sum() == 4
    assert model.patch_embed.proj.weight.grad is not None


def test_models_mae_unknown_name_suggests_close_matches():
    with pytest.raises(ValueError, match=r"Did you mean: mae_vit_small_patch16_dec128d2b.*--model list"):
        models_mae.create_model("mae_vit_small_patch16_dec128d2")


def test_models_mae_state_dict_keys_match_reference():
    sd = models_mae.create_model("mae_vit_small_patch16_dec128d2b").state_dict()
    expected = {"cls_token": (1, 1, 384), "pos_embed": (1, 197, 384), "patch_embed.proj.weight": (384, 3, 16, 16),
                "blocks.11.attn.qkv.weight": (1152, 384), "blocks.0.norm1.bias": (384,), "blocks.3.mlp.fc2.weight":
                (384, 1536), "norm.weight": (384,), "decoder_embed.weight": (128, 384), "mask_token": (1, 1, 128),
                "decoder_pos_embed": (1, 197, 128), "decoder_blocks.1.attn.proj.weight": (128, 128),
                "decoder_norm.bias": (128,), "decoder_pred.weight": (768, 128)}
    for key, shape in expected.items():
        assert tuple(sd[key].shape) == shape, key
    prefixes = {k.split(".")[0] for k in sd}
    assert prefixes == {"cls_token", "pos_embed", "patch_embed", "blocks", "norm", "decoder_embed", "mask_token",
                        "decoder_pos_embed", "decoder_blocks", "decoder_norm", "decoder_pred"}


def test_models_mae_pos_embed_fixed_sincos():
    model = models_mae.create_model("mae_vit_debug_patch16", img_size=64)
    assert not model.pos_embed.requires_grad and not model.decoder_pos_embed.requires_grad
    # MAE's table in closed form: after the zero cls row, patch (row i, column j) is [sin(j w), cos(j w), sin(i w),
    # cos(i w)] with w_m = 10000^(-m / (D/4)); MAE's meshgrid puts the column index in the first half
    for table in (model.pos_embed[0], model.decoder_pos_embed[0]):
        dim, grid = table.shape[-1], 4
        omega = 10000.0 ** (-torch.arange(dim // 4, dtype=torch.float64) / (dim // 4))
        i, j = torch.meshgrid(torch.arange(grid), torch.arange(grid), indexing="ij")
        row, col = i.reshape(-1, 1) * omega, j.reshape(-1, 1) * omega
        expected = torch.cat([col.sin(), col.cos(), row.sin(), row.cos()], dim=1)
        assert torch.all(table[0] == 0)  # cls position
        torch.testing.assert_close(table[1:].double(), expected, rtol=0, atol=1e-6)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert "pos_embed" not in trainable and "decoder_pos_embed" not in trainable


@pytest.mark.parametrize("norm_pix_loss", [False, True])
@pytest.mark.parametrize("in_chans", [3, 1])
def test_models_mae_matches_reference_forward(norm_pix_loss, in_chans):
    model = models_mae.create_model("mae_vit_debug_patch16", img_size=64, in_chans=in_chans,
                                    norm_pix_loss=norm_pix_loss).eval()
    imgs = torch.randn(3, in_chans, 64, 64)
    torch.manual_seed(7)
    loss, pred, mask = model(imgs, mask_ratio=0.75)
    torch.manual_seed(7)
    ref_loss, ref_pred, ref_mask = reference_forward(model.state_dict(), imgs, 0.75, 16, 2, 4, 1, 4, norm_pix_loss)
    assert torch.equal(mask, ref_mask)
    torch.testing.assert_close(pred, ref_pred, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(loss, ref_loss, rtol=1e-5, atol=1e-6)


def test_models_mae_encoder_loads_into_timm_vit():
    model = models_mae.create_model("mae_vit_small_patch16_dec128d2b")
    vit = timm.create_model("vit_small_patch16_224", pretrained=False)
    result = vit.load_state_dict(model.encoder_state_dict(), strict=False)
    assert sorted(result.missing_keys) == ["head.bias", "head.weight"] and not result.unexpected_keys
    x = torch.randn(1, 3, 224, 224)
    vit.eval(), model.eval()
    torch.testing.assert_close(vit.forward_features(x), model.forward_features(x), rtol=1e-4, atol=1e-4)


def test_models_mae_masking_keeps_exact_count_and_is_seeded():
    model = models_mae.create_model("mae_vit_debug_patch16", img_size=224)
    x = torch.randn(4, 196, 64)
    for ratio in (0.0, 0.5, 0.75, 0.9):
        kept, mask, _ = model.random_masking(x, ratio)
        assert kept.shape[1] == int(196 * (1 - ratio))
        assert torch.all(mask.sum(dim=1) == 196 - int(196 * (1 - ratio)))
    torch.manual_seed(3)
    _, m1, _ = model.random_masking(x, 0.9)
    torch.manual_seed(3)
    _, m2, _ = model.random_masking(x, 0.9)
    torch.manual_seed(4)
    _, m3, _ = model.random_masking(x, 0.9)
    assert torch.equal(m1, m2) and not torch.equal(m1, m3)


def test_models_mae_visible_tokens_reach_encoder():
    model = models_mae.create_model("mae_vit_debug_patch16", img_size=224)
    seen = []
    model.blocks[0].register_forward_hook(lambda mod, inp, out: seen.append(inp[0].shape[1]))
    model(torch.randn(1, 3, 224, 224), mask_ratio=0.9)
    assert seen == [1 + 19]


@pytest.mark.parametrize("in_chans", [1, 3])
@pytest.mark.parametrize("size", [(32, 32), (48, 64)])
def test_patchify_roundtrip(in_chans, size):
    imgs = torch.randn(2, in_chans, *size)
    x = patchify(imgs, 16)
    assert x.shape == (2, size[0] // 16 * size[1] // 16, 256 * in_chans)
    assert torch.equal(unpatchify(x, 16, in_chans, (size[0] // 16, size[1] // 16)), imgs)


def test_models_mae_model_patchify_follows_in_chans():
    model = models_mae.create_model("mae_vit_debug_patch16", img_size=32, in_chans=1)
    imgs = torch.randn(2, 1, 32, 32)
    assert model.patchify(imgs).shape == (2, 4, 256)
    assert torch.equal(model.unpatchify(model.patchify(imgs)), imgs)


@pytest.mark.parametrize("ratio", [1.0, -0.1, 1.5])
def test_models_mae_rejects_bad_mask_ratio(ratio):
    with pytest.raises(ValueError, match=r"mask_ratio .* \[0, 1\)"):
        models_mae.create_model("mae_vit_debug_patch16", img_size=32, mask_ratio=ratio)
    model = models_mae.create_model("mae_vit_debug_patch16", img_size=32)
    with pytest.raises(ValueError, match="mask_ratio"):
        model(torch.randn(1, 3, 32, 32), mask_ratio=ratio)


def test_models_mae_rejects_size_not_divisible_by_patch():
    with pytest.raises(ValueError, match="input_size 100 must be divisible by the patch size 16"):
        models_mae.create_model("mae_vit_debug_patch16", img_size=100)


def test_models_mae_constructor_makes_no_device_assumption():
    with torch.device("meta"):
        model = models_mae.create_model("mae_vit_debug_patch16", img_size=32)
    assert model.cls_token.device.type == "meta"
