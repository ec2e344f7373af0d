"""The next batch on its way to the device while this one trains.

`one_ahead` is the order: item i+1 is started (its copy queued) before item i is handed to the training step. On
CUDA, `SideStream` queues that work (the host-to-device copy from the loader's pinned memory, and --gpu_augment) on
a second stream, so the compute stream never waits on a copy; the batch is handed over with the compute stream made
to wait for it, and its tensors marked as used there, so the allocator does not reuse their memory early. On the
CPU there is no stream and no overlap: the same order, run in place.
"""
from collections.abc import Callable, Iterable, Iterator

import torch


def one_ahead(items: Iterable, start: Callable, finish: Callable) -> Iterator:
    """finish(start(x)) for each x in order, with start(next x) called before finish(this x) is yielded."""
    pending, have = None, False
    for item in items:
        started = start(item)
        if have:
            yield finish(pending)
        pending, have = started, True
    if have:
        yield finish(pending)


class SideStream:
    """Runs work on a side CUDA stream and hands its tensors to the compute stream."""

    def __init__(self, device: torch.device):
        self.side = torch.cuda.Stream(device)
        self.compute = torch.cuda.current_stream(device)

    def run(self, work: Callable):
        with torch.cuda.stream(self.side):
            return work()

    def hand_over(self, tensors):
        self.compute.wait_stream(self.side)
        for t in tensors:
            if isinstance(t, torch.Tensor) and t.device.type == "cuda":
                t.record_stream(self.compute)
        return tensors


def on_device(batches: Iterable, to_device: Callable, device: torch.device) -> Iterator:
    """(step, batch on the device) for each (step, batch): one ahead, on a side stream on CUDA."""
    if device.type != "cuda":
        return one_ahead(batches, lambda sb: (sb[0], to_device(sb[1], sb[0])), lambda sb: sb)
    stream = SideStream(device)
    return one_ahead(batches, lambda sb: (sb[0], stream.run(lambda: to_device(sb[1], sb[0]))),
                     lambda sb: (sb[0], stream.hand_over(sb[1])))
