"""data/sampler.py: DistributedSampler's order, resumable mid-epoch."""
import torch

from data.sampler import ResumableSampler


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
