import argparse
import math

import pytest
import torch

import models_mae
import models_mae_cnn
from data.sampler import ResumableSampler
from tests.reference_impl import reference_param_groups
from util.args import resolve_lr
from util.lr_sched import adjust_learning_rate, lr_at
from util.optim import build_optimizer, param_groups


def test_lr_schedule_warmup_cosine_values():
    lr, min_lr, warm, epochs = 1.2e-3, 1e-5, 40, 800
    assert lr_at(0, lr, min_lr, warm, epochs) == 0
    assert lr_at(20, lr, min_lr, warm, epochs) == pytest.approx(lr / 2)
    assert lr_at(40, lr, min_lr, warm, epochs) == pytest.approx(lr)
    assert lr_at(420, lr, min_lr, warm, epochs) == pytest.approx(min_lr + (lr - min_lr) * 0.5)
    assert lr_at(800, lr, min_lr, warm, epochs) == pytest.approx(min_lr)
    mid = 40 + 760 / 3
    expected = min_lr + (lr - min_lr) * 0.5 * (1 + math.cos(math.pi / 3))
    assert lr_at(mid, lr, min_lr, warm, epochs) == pytest.approx(expected)


def test_lr_schedule_fixed_lr_after_warmup():
    assert lr_at(10, 1.0, 0.0, 40, 800, fixed_lr=True) == pytest.approx(0.25)
    assert lr_at(700, 1.0, 0.0, 40, 800, fixed_lr=True) == 1.0


def test_adjust_learning_rate_sets_every_group():
    p = torch.nn.Parameter(torch.zeros(2))
    opt = torch.optim.AdamW([{"params": [p]}, {"params": [torch.nn.Parameter(torch.zeros(1))], "lr_scale": 0.5}])
    args = argparse.Namespace(lr=1.0, min_lr=0.0, warmup_epochs=2, epochs=10, fixed_lr=False)
    assert adjust_learning_rate(opt, 1.0, args) == pytest.approx(0.5)
    assert [g["lr"] for g in opt.param_groups] == pytest.approx([0.5, 0.25])


def test_lr_rule_uses_effective_batch():
    args = argparse.Namespace(batch_size=256, accum_iter=1, lr=None, blr=1.5e-4)
    assert resolve_lr(args, world_size=8) == 2048 and args.lr == pytest.approx(1.2e-3)
    args = argparse.Namespace(batch_size=64, accum_iter=32, lr=None, blr=1.5e-4)
    assert resolve_lr(args, world_size=1) == 2048 and args.lr == pytest.approx(1.2e-3)
    args = argparse.Namespace(batch_size=64, accum_iter=1, lr=0.1, blr=1.5e-4)
    resolve_lr(args, world_size=4)
    assert args.lr == 0.1


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


def test_sampler_ranks_disjoint_and_cover():
    shards = [ResumableSampler(40, num_replicas=2, rank=r, seed=5) for r in range(2)]
    for s in shards:
        s.set_epoch(3)
    idx = [[i for i, _ in s] for s in shards]
    assert not set(idx[0]) & set(idx[1]) and sorted(idx[0] + idx[1]) == list(range(40))
    seeds = [seed for s in shards for _, seed in s]
    assert len(set(seeds)) == 40


def test_sampler_matches_distributed_sampler_order():
    ours = ResumableSampler(37, num_replicas=2, rank=1, seed=9)
    ref = torch.utils.data.DistributedSampler(range(37), num_replicas=2, rank=1, seed=9)
    ours.set_epoch(2)
    ref.set_epoch(2)
    assert [i for i, _ in ours] == list(ref)


def test_sampler_epochs_differ_and_resume_mid_epoch():
    s = ResumableSampler(30, seed=0)
    s.set_epoch(0)
    e0 = list(s)
    s.set_epoch(1)
    assert [i for i, _ in s] != [i for i, _ in e0]
    s.set_epoch(0)
    s.set_start(12)
    assert list(s) == e0[12:] and len(s) == 18


def test_sampler_repeated_aug_repeats_each_image():
    s = ResumableSampler(12, num_replicas=1, rank=0, seed=0, repeats=3)
    items = [i for i, _ in s]
    assert len(items) == 12 and items[0] == items[1] == items[2]


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
