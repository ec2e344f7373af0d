"""A distributed sampler that can resume mid-epoch and seeds each sample's augmentation.

The order equals DistributedSampler's (randperm seeded with seed + epoch, padded, strided by
rank). Each index is yielded with a per-sample seed derived from (seed, epoch, position), so the
augmentation of a sample does not depend on which worker decodes it or on where a run resumed.
"""
import torch
from torch.utils.data import Sampler


class ResumableSampler(Sampler):
    def __init__(self, dataset_len: int, num_replicas: int = 1, rank: int = 0, shuffle: bool = True, seed: int = 0,
                 repeats: int = 1):
        if dataset_len <= 0:
            raise ValueError("the pre-training dataset is empty")
        self.dataset_len = dataset_len
        self.num_replicas = num_replicas
        self.rank = rank
        self.shuffle = shuffle
        self.seed = seed
        self.epoch = 0
        self.start = 0
        self.repeats = repeats
        # --repeated-aug: each image appears `repeats` times per epoch, spread over ranks; the epoch keeps its length
        self.total_size = -(-dataset_len * repeats // num_replicas) * num_replicas
        self.num_samples = self.total_size // num_replicas if repeats == 1 else max(dataset_len // num_replicas, 1)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch
        self.start = 0

    def set_start(self, start: int) -> None:
        """Skip the first `start` samples of this rank's shard (resuming mid-epoch)."""
        self.start = start

    def shard(self) -> list[int]:
        if self.shuffle:
            g = torch.Generator()
            g.manual_seed(self.seed + self.epoch)
            indices = torch.randperm(self.dataset_len, generator=g).tolist()
        else:
            indices = list(range(self.dataset_len))
        if self.repeats > 1:
            indices = [i for i in indices for _ in range(self.repeats)]
        padding = self.total_size - len(indices)
        indices += (indices * (padding // max(len(indices), 1) + 1))[:padding]
        return indices[self.rank:self.total_size:self.num_replicas][:self.num_samples]

    def __iter__(self):
        base = (self.seed * 1_000_003 + self.epoch) * 1_000_003 * self.num_replicas
        shard = self.shard()
        for pos in range(self.start, len(shard)):
            yield shard[pos], (base + pos * self.num_replicas + self.rank) % (2**63)

    def __len__(self) -> int:
        return self.num_samples - self.start
