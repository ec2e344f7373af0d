"""engine.py, in this process on a tiny model: the state's round trip through a checkpoint, the non-finite guard,
stop_if_asked, the one-line and traceback reports, and a toy task plugged into engine.run (what a new task writes)."""
import argparse
import json
import logging

import pytest
import torch

import engine
from engine import Selection, SelectionState, Task, TaskData, TrainState
from tests.helpers import argv
from util import checkpoint as ckpt_lib
from util import dist as dist_lib
from util.args import ExitCode, add_common_args
from util.log import RunLog
from util.precision import LossScaler
from util.preemption import Preempted, PreemptionFlag


def toy_args(out, *argv) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    add_common_args(parser, batch_size=8, epochs=3, weight_decay=0.0, blr=0.5, min_lr=0.0, warmup_epochs=0,
                    save_freq=0)
    parser.add_argument("--model", default="toy_linear")
    parser.add_argument("--input_size", default=4, type=int)
    parser.add_argument("--in_chans", default=1, type=int)
    parser.add_argument("--patience", default=0, type=int)
    parser.add_argument("--fail_in", default="")  # ToyTask raises KeyError there: a bug, for the report test
    return parser.parse_args(["--output_dir", str(out), "--log_dir", "", "--device", "cpu", "--num_workers", "0",
                              "--print_freq", "100", *argv])


class SeededPairs(torch.utils.data.Dataset):
    """(x, y) pairs indexed as the engine's sampler indexes: (index, per-sample seed)."""

    def __init__(self, x, y):
        self.x, self.y = x, y

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, item):
        index, _seed = item
        return self.x[index], self.y[index]


class ToyTask(Task):
    """Least squares y = x . w: the whole of a task, selecting on the lowest validation loss."""

    name = "toy"
    state_class = SelectionState
    selection = Selection("val_loss", higher_is_better=False, description="validation MSE")

    def __init__(self):
        generator = torch.Generator().manual_seed(0)
        w = torch.randn(4, 1, generator=generator)
        x = torch.randn(96, 4, generator=generator)
        self.train = SeededPairs(x[:64], x[:64] @ w)
        self.val = (x[64:], x[64:] @ w)
        self.finished = None

    def build_data(self, args, info, device) -> TaskData:
        return TaskData(train=self.train, name="the toy set", batch_bytes=args.batch_size * 5 * 4)

    def build_model(self, args) -> torch.nn.Module:
        return torch.nn.Linear(4, 1, bias=False)

    def build_optimizer(self, args, model, device) -> torch.optim.Optimizer:
        return torch.optim.SGD(model.parameters(), lr=args.lr)

    def to_device(self, run, state, batch, step: int) -> tuple:
        return tuple(t.to(run.device) for t in batch)

    def loss(self, run, batch: tuple) -> torch.Tensor:
        if run.args.fail_in == "loss":
            raise KeyError("a bug in the task")
        x, y = batch
        return torch.nn.functional.mse_loss(run.model(x), y)

    @torch.no_grad()
    def evaluate(self, run, state, epoch: int, last: bool) -> dict:
        x, y = self.val
        return {"val_loss": torch.nn.functional.mse_loss(run.model_without_ddp(x), y).item()}

    def finish(self, run, state) -> None:
        self.finished = (state.best_epoch, state.best_score)


def test_a_toy_task_trains_selects_and_resumes_through_engine_run(tmp_path):
    task = ToyTask()
    assert engine.run(task, toy_args(tmp_path)) == ExitCode.OK
    lines = [json.loads(line) for line in (tmp_path / "log.txt").read_text().splitlines()]
    losses = [line["val_loss"] for line in lines]
    assert [line["epoch"] for line in lines] == [0, 1, 2] and losses[-1] < losses[0]
    assert task.finished == (2, losses[2]) and lines[-1]["best_val_loss"] == losses[2]
    best = ckpt_lib.load_checkpoint(str(tmp_path / "checkpoint-best.pth"))
    assert best["task"] == "toy" and best["epoch"] == 2
    assert best["val_history"] == [[e, v] for e, v in enumerate(losses)]
    assert not list(tmp_path.glob("checkpoint-[0-9]*.pth"))  # --save_freq 0: no periodic copies
    assert lines[0]["train_images_per_s"] > 0 and 0 <= lines[0]["train_data_wait_fraction"] <= 1
    # two more epochs continue from the checkpoint: the state came back, the selection goes on
    again = ToyTask()
    assert engine.run(again, toy_args(tmp_path, "--epochs", "5", "--save_freq", "1", "--keep_last", "2")) == 0
    lines = [json.loads(line) for line in (tmp_path / "log.txt").read_text().splitlines()]
    assert [line["epoch"] for line in lines] == [0, 1, 2, 3, 4]
    assert sorted(p.name for p in tmp_path.glob("checkpoint-[0-9]*.pth")) == ["checkpoint-3.pth", "checkpoint-4.pth"]
    last = ckpt_lib.load_checkpoint(str(tmp_path / "checkpoint-last.pth"))
    assert [e for e, _ in last["val_history"]] == [0, 1, 2, 3, 4] and last["optimizer_steps"] == 5 * 8


def test_a_checkpoint_of_another_task_is_refused_in_one_line(tmp_path, caplog):
    assert engine.run(ToyTask(), toy_args(tmp_path, "--epochs", "1")) == 0
    other = ToyTask()
    other.name = "another"
    assert engine.run(other, toy_args(tmp_path, "--epochs", "2")) == ExitCode.FAILED
    assert "holds another run" in caplog.text and "the task: 'toy' there, 'another' now" in caplog.text
    # and no flag makes a checkpoint of one task resume as another
    assert engine.run(other, toy_args(tmp_path, "--epochs", "2", "--resume_with_changes")) == ExitCode.FAILED
    assert "is a checkpoint of toy, and this script runs another; give this run its own --output_dir" in caplog.text
    assert "Traceback" not in caplog.text


def test_a_checkpoint_of_another_shape_names_the_flags_that_differ(tmp_path, caplog):
    assert engine.run(ToyTask(), toy_args(tmp_path / "a", "--epochs", "1")) == 0
    wider = ToyTask()
    wider.build_model = lambda args: torch.nn.Linear(args.input_size, 1, bias=False)
    resumed = toy_args(tmp_path / "b", "--epochs", "2", "--input_size", "5",
                       "--resume", str(tmp_path / "a" / "checkpoint-last.pth"))
    assert engine.run(wider, resumed) == ExitCode.FAILED
    expected = "holds a model that this run's flags do not build (--input_size 4 there, 5 here: size mismatch"
    assert expected in caplog.text
    assert "Traceback" not in caplog.text and not (tmp_path / "b" / "checkpoint-last.pth").exists()


def test_a_bug_is_reported_with_its_traceback_then_one_line(tmp_path, caplog):
    caplog.set_level(logging.INFO)
    assert engine.run(ToyTask(), toy_args(tmp_path, "--fail_in", "loss")) == ExitCode.FAILED
    errors = [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert errors[0].exc_info and errors[0].exc_info[0] is KeyError  # the traceback, on the failing rank
    assert errors[-1].getMessage() == "error: unexpected KeyError: 'a bug in the task'"


# ---- the pieces, on a hand-built Run ---------------------------------------------------------------------------

def toy_run(tmp_path, task=None, **flags) -> engine.Run:
    args = toy_args(tmp_path, *argv(flags))
    args.lr = 0.1
    task = task or ToyTask()
    model = task.build_model(args)
    data = task.build_data(args, dist_lib.DistInfo(), torch.device("cpu"))
    tmp_path.mkdir(exist_ok=True)
    return engine.Run(args=args, task=task, info=dist_lib.DistInfo(), device=torch.device("cpu"), precision="fp32",
                      model=model, model_without_ddp=model, optimizer=task.build_optimizer(args, model, None),
                      scaler=LossScaler("fp32", torch.device("cpu")), loader=None, sampler=None, steps_per_epoch=8,
                      data=data, run_log=RunLog(str(tmp_path), None, enabled=True), preemption=PreemptionFlag())


def test_a_non_finite_step_is_skipped_and_counted(tmp_path):
    run = toy_run(tmp_path)
    state = TrainState()
    before = run.model.weight.detach().clone()
    run.model(torch.ones(2, 4)).sum().backward()
    loss, _, stepped = engine.optimizer_step(run, state, torch.tensor(float("nan")))
    assert not stepped and state.bad_steps_total == 1 and state.bad_steps_in_a_row == 1 and state.optimizer_steps == 0
    assert torch.equal(run.model.weight, before) and run.model.weight.grad is None  # no update, gradients cleared
    run.model(torch.ones(2, 4)).sum().backward()
    _, norm, stepped = engine.optimizer_step(run, state, torch.tensor(1.0))
    assert stepped and state.bad_steps_in_a_row == 0 and state.optimizer_steps == 1 and norm > 0
    assert not torch.equal(run.model.weight, before)


def test_stop_if_asked_writes_checkpoint_last_then_stops(tmp_path):
    run = toy_run(tmp_path / "preempted")
    state = TrainState(epoch=1, step=3, optimizer_steps=11)
    engine.stop_if_asked(run, state)  # nothing asked: no checkpoint, no stop
    assert not (tmp_path / "preempted" / "checkpoint-last.pth").exists()
    state.preemption_requested = True
    with pytest.raises(Preempted):
        engine.stop_if_asked(run, state)
    ckpt = ckpt_lib.load_checkpoint(str(tmp_path / "preempted" / "checkpoint-last.pth"))
    assert (ckpt["epoch"], ckpt["step"], ckpt["optimizer_steps"]) == (1, 3, 11)

    run = toy_run(tmp_path / "bad", max_bad_steps=2)
    state = TrainState(bad_steps_in_a_row=2, bad_steps_total=2)
    with pytest.raises(engine.TooManyBadSteps, match="--max_bad_steps 2"):
        engine.stop_if_asked(run, state)
    assert ckpt_lib.load_checkpoint(str(tmp_path / "bad" / "checkpoint-last.pth"))["bad_steps_total"] == 2


def test_the_state_round_trips_through_a_checkpoint_by_its_fields(tmp_path):
    run = toy_run(tmp_path)
    state = SelectionState(epoch=4, step=2, optimizer_steps=37, bad_steps_total=3, scaler_skips_total=1,
                           bad_steps_in_a_row=1, best_score=0.25, best_epoch=3, val_history=[[3, 0.25]],
                           scores_since_best=1, stopped_early=True)
    engine.save(run, state, state.epoch, state.step)
    ckpt = ckpt_lib.load_checkpoint(str(tmp_path / "checkpoint-last.pth"))
    restored = SelectionState()
    restored.restore(ckpt)
    kept = {f: getattr(state, f) for f in ("epoch", "step", *state.checkpoint_fields())}
    assert {f: getattr(restored, f) for f in kept} == kept
    assert restored.bad_steps_in_a_row == 0  # a process-lifetime field is not checkpointed
    assert set(state.checkpoint_fields()) <= set(ckpt) and "bad_steps_in_a_row" not in ckpt
    # a finished epoch (step 0) resumes at the next one; a classification checkpoint of before this engine named
    # the best score best_auroc
    older = SelectionState()
    older.restore({"epoch": 5, "step": 0, "best_auroc": 0.7, "optimizer_steps": 9})
    assert (older.epoch, older.step, older.best_score, older.optimizer_steps) == (6, 0, 0.7, 9)


@pytest.mark.parametrize("error, lost_peer", [
    (torch.distributed.DistBackendError("NCCL communicator was aborted"), True),
    (torch.distributed.DistNetworkError("store connection lost"), True),
    (RuntimeError("[/pytorch/third_party/gloo/gloo/transport/tcp/pair.cc:561] Connection closed by peer "
                  "[127.0.0.1]:7838"), True),
    (RuntimeError("CUDA out of memory"), False),
    (KeyError("Connection closed by peer"), False),  # the text alone does not make a lost peer
])
def test_a_lost_peer_is_told_by_its_exception_type(error, lost_peer):
    assert dist_lib.is_communication_failure(error) == lost_peer
