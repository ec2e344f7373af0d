"""Issue 17, item 8: the batches DataLoader workers keep ready are bounded, and a too-small /dev/shm stops the run
before any compute, naming the flags."""
import argparse

import pytest
import torch

import engine
from engine import PREFETCH_BUDGET_BYTES, TaskData, prefetch_batches
from engine_pretrain import batch_bytes
from util.dist import DistInfo


def loader_args(**overrides):
    flags = {"num_workers": 8, "batch_size": 256, "input_size": 224, "in_chans": 3, "gpu_augment": False,
             "gpu_augment_canvas": 416}
    flags.update(overrides)
    return argparse.Namespace(**flags)


def test_ready_batches_stay_within_the_budget():
    small = loader_args(batch_size=4, input_size=32)
    assert prefetch_batches(small, batch_bytes(small), None) == engine.PREFETCH_BATCHES  # tiny batches: the usual 4
    big = loader_args()  # the recipe's 256 x 3 x 224 x 224 fp32: 154 MB a batch
    assert batch_bytes(big) == 256 * 3 * 224 * 224 * 4
    # 8 x 154 MB already pass 1 GiB: one ready batch per worker
    assert prefetch_batches(big, batch_bytes(big), None) == 1
    mid = loader_args(batch_size=64)
    held = prefetch_batches(mid, batch_bytes(mid), None) * mid.num_workers * batch_bytes(mid)
    assert 1 < prefetch_batches(mid, batch_bytes(mid), None) < 4 and held <= PREFETCH_BUDGET_BYTES
    assert batch_bytes(loader_args(gpu_augment=True)) == 256 * 416 * 416  # uint8 canvases
    assert prefetch_batches(loader_args(num_workers=0), 1, None) is None


def test_free_shared_memory_lowers_the_prefetch_or_stops_the_run():
    mid = loader_args(batch_size=64)
    per_round = mid.num_workers * batch_bytes(mid)
    assert prefetch_batches(mid, batch_bytes(mid), 2 * per_round + 1) == 2
    message = (r"--num_workers 8 x --batch_size 256 on 1 rank\(s\) of this node needs at least 1176 MB of shared "
               r"memory \(/dev/shm\), and 64 MB are free.*--shm-size")
    with pytest.raises(ValueError, match=message):
        prefetch_batches(loader_args(), batch_bytes(loader_args()), 64 * 2**20)


def test_shared_memory_is_checked_for_every_rank_of_the_node():
    """/dev/shm is one per node: 8 ranks of 8 workers with 154 MB batches need 9.4 GB for one batch each, so 8 GB
    free stops the run, and the suggested size holds the full prefetch of every rank (4 batches: 38 GB, 37g + 1)."""
    big = loader_args()
    assert prefetch_batches(big, batch_bytes(big), 8 * 2**30, ranks_per_node=1) == 1  # one rank alone fits
    with pytest.raises(ValueError, match=r"on 8 rank\(s\) of this node needs at least 9408 MB .* --shm-size 38g"):
        prefetch_batches(big, batch_bytes(big), 8 * 2**30, ranks_per_node=8)
    mid = loader_args(batch_size=64)
    node_round = 8 * mid.num_workers * batch_bytes(mid)
    assert prefetch_batches(mid, batch_bytes(mid), 2 * node_round + 1, ranks_per_node=8) == 2


def test_ranks_per_node_come_from_the_launcher():
    from util.dist import DistInfo, ranks_on_this_node

    two_nodes = DistInfo(rank=3, world_size=16, local_rank=3, source="torchrun")
    assert ranks_on_this_node(two_nodes, {"LOCAL_WORLD_SIZE": "8"}) == 8
    assert ranks_on_this_node(two_nodes, {"SLURM_TASKS_PER_NODE": "8(x2)"}) == 8
    assert ranks_on_this_node(DistInfo(), {"LOCAL_WORLD_SIZE": "8"}) == 1  # a single process


def test_the_loader_uses_the_bounded_prefetch(monkeypatch):
    monkeypatch.setattr(engine, "shm_free_bytes", lambda: None)  # this machine's /dev/shm size aside
    args = loader_args(batch_size=64, repeated_aug=False, seed=0, max_steps_per_epoch=None, pin_mem=False,
                       accum_iter=1)
    data = TaskData(train=list(range(64)), name="the data", batch_bytes=batch_bytes(args))
    loader, _, _ = engine.train_loader(args, data, DistInfo(), torch.device("cpu"))
    # 8 workers x 38.5 MB batches in 1 GiB
    assert loader.prefetch_factor == prefetch_batches(args, batch_bytes(args), None) == 3
