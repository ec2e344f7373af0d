"""util/optim.py: the reference's AdamW groups and the fused kernel."""
import pytest
import torch

import models_mae
import models_mae_cnn
from tests.reference_impl import reference_param_groups
from util.optim import build_optimizer, param_groups


def _group_names(model, groups):
    names = {id(p): n for n, p in model.named_parameters()}
    return [([names[id(p)] for p in g["params"]], g["weight_decay"]) for g in groups]


@pytest.mark.parametrize("build", [lambda: models_mae.create_model("mae_vit_debug_patch16", img_size=32),
                                   lambda: models_mae_cnn.create_model("resnet18", img_size=64)],
                         ids=["vit", "cnn"])
def test_param_groups_are_the_references_by_default(build):
    """Same tensors, same order, same decay as timm's add_weight_decay: a reference optimizer state fits them."""
    model = build()
    ours = _group_names(model, param_groups(model, 0.05))
    assert ours == _group_names(model, reference_param_groups(model, 0.05))
    (no_decay, zero), (decay, wd) = ours
    assert zero == 0.0 and wd == 0.05 and "pos_embed" not in no_decay + decay  # fixed tables are not trained


def test_param_groups_no_decay_tokens_exempts_the_cls_and_mask_tokens():
    model = models_mae.create_model("mae_vit_debug_patch16", img_size=32)
    (default_no_decay, _), (default_decay, _) = _group_names(model, param_groups(model, 0.05))
    (no_decay, _), (decay, _) = _group_names(model, param_groups(model, 0.05, decay_tokens=False))
    tokens = {"cls_token", "mask_token"}
    assert tokens <= set(default_decay) and tokens <= set(no_decay) and not tokens & set(decay)
    assert set(no_decay) - set(default_no_decay) == tokens and set(default_decay) - set(decay) == tokens


def test_optimizer_is_fused_on_cpu_and_matches_the_reference_adamw():
    """The fused kernel is a speed choice only: fed the same gradients, it updates like torch's for-loop AdamW."""
    torch.manual_seed(0)
    model = models_mae.create_model("mae_vit_debug_patch16", img_size=32)
    reference = models_mae.create_model("mae_vit_debug_patch16", img_size=32)
    reference.load_state_dict(model.state_dict())
    initial = model.patch_embed.proj.weight.detach().clone()
    fused = build_optimizer(model, 0.05, 1e-3, torch.device("cpu"))
    plain = torch.optim.AdamW(param_groups(reference, 0.05), lr=1e-3, betas=(0.9, 0.95), foreach=False)
    assert fused.defaults["fused"] is True
    for _ in range(3):
        for p, q in zip(model.parameters(), reference.parameters(), strict=True):
            p.grad = torch.randn_like(p)
            q.grad = p.grad.clone()
        fused.step()
        plain.step()
    for (name, a), b in zip(model.state_dict().items(), reference.state_dict().values(), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7, msg=name)
    assert not torch.equal(model.patch_embed.proj.weight, initial)  # the steps did move the weights
