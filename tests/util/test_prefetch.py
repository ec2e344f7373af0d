"""util/prefetch.py and the engine's step: the next batch is started before this one trains, every batch once and in
order, and a training step converts nothing from the device to the host but the one value optimizer_step reads."""
import contextlib
import json

import pytest
import torch

import engine
import main_pretrain_multi_datasets_xray as vit_main
from engine_pretrain import PretrainTask
from tests.helpers import in_process_args
from util.args import ExitCode
from util.prefetch import on_device, one_ahead


def test_one_ahead_starts_the_next_item_before_handing_over_this_one():
    events = []

    def start(x):
        events.append(f"start {x}")
        return x

    def finish(x):
        events.append(f"hand {x}")
        return x * 10

    consumed = []
    for value in one_ahead(range(3), start, finish):
        events.append(f"train {value // 10}")
        consumed.append(value)
    assert consumed == [0, 10, 20]
    assert events == ["start 0", "start 1", "hand 0", "train 0", "start 2", "hand 1", "train 1", "hand 2", "train 2"]
    assert list(one_ahead([], start, finish)) == [] and list(one_ahead([7], start, finish)) == [70]


def test_on_device_on_the_cpu_moves_each_batch_once_in_order():
    moved = []
    batches = [(step, torch.full((2,), step)) for step in range(4)]
    out = list(on_device(iter(batches), lambda b, step: moved.append(step) or (b + 1,), torch.device("cpu")))
    assert moved == [0, 1, 2, 3] and [s for s, _ in out] == [0, 1, 2, 3]
    assert all(torch.equal(b[0], torch.full((2,), s + 1)) for s, b in out)


HOST_READS = ("item", "tolist", "numpy", "cpu", "__float__", "__int__", "__bool__")


@contextlib.contextmanager
def counting_host_reads(counts: dict, active: list):
    """Count every Tensor -> host conversion made while active[0] is True (the originals still run)."""
    originals = {name: getattr(torch.Tensor, name) for name in HOST_READS}

    def counted(name):
        def read(self, *a, **k):
            if active[0]:
                counts[name] = counts.get(name, 0) + 1
            return originals[name](self, *a, **k)
        return read

    try:
        for name in HOST_READS:
            setattr(torch.Tensor, name, counted(name))
        yield
    finally:
        for name, fn in originals.items():
            setattr(torch.Tensor, name, fn)


class CountingTask(PretrainTask):
    """Pre-training, with host reads counted from the first batch's arrival on the device to the evaluation, except
    in to_device (the loader's CPU tensors are read there, on the host side of the copy). Before the first batch, the
    sampler's and loader's once-an-epoch CPU set-up is not a training step."""

    def __init__(self, *a, active, steps):
        super().__init__(*a)
        self.active, self.steps = active, steps

    def to_device(self, run, state, batch, step):
        self.active[0] = False
        try:
            return super().to_device(run, state, batch, step)
        finally:
            self.active[0] = True

    def count(self, state, batch):
        super().count(state, batch)
        self.steps[0] += 1

    def evaluate(self, run, state, epoch, last):
        self.active[0] = False
        return super().evaluate(run, state, epoch, last)


@pytest.mark.slow
def test_a_training_step_reads_one_value_from_the_device(tiny_data, tmp_path):
    """The mechanism behind 'at most one host sync per optimizer step' (on CUDA every read of a device tensor waits
    for the device; tests/test_gpu.py counts the syncs themselves there): in 6 steps, 6 reads, all of them the
    optimizer step's one .tolist()."""
    counts, active, steps = {}, [False], [0]
    # one loader worker: the data pipeline's own CPU tensors are read in that process, not counted here
    args = in_process_args(vit_main, tiny_data[0], str(tmp_path), max_steps_per_epoch=6, epochs=1, print_freq=2,
                           num_workers=1)
    task = CountingTask(vit_main.build_model, vit_main.check_model_args, active=active, steps=steps)
    with counting_host_reads(counts, active):
        assert engine.run(task, args) == ExitCode.OK
    line = json.loads((tmp_path / "log.txt").read_text().splitlines()[-1])
    assert steps[0] == 6 and line["epoch"] == 0
    assert counts == {"tolist": 6}, counts
