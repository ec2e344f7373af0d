"""Checkpoints that survive crashes and load safely.

Writes are atomic (temp file in the same folder, fsync, os.replace), so a kill during a save leaves
the previous file intact. Loading always uses torch.load(weights_only=True); reference checkpoints,
which pickle an argparse.Namespace, load through an explicit allow-list of that one class.
"""
import argparse
import glob
import logging
import os
import pickle
import random
import re
import shutil
import zipfile

import numpy as np
import torch

from util.errors import SetupError

logger = logging.getLogger(__name__)

LAST_NAME = "checkpoint-last.pth"
BEST_NAME = "checkpoint-best.pth"  # tasks that select on validation: the selected epoch
_PERIODIC = re.compile(r"checkpoint-(\d+)\.pth$")


class UnsafeCheckpointError(SetupError):
    """The file asks the unpickler to build something other than tensors and plain data."""


class CheckpointWriteError(RuntimeError):
    """A checkpoint could not be written (full disk, quota, I/O error); the previous file is intact."""


def payload_bytes(obj) -> int:
    """Bytes torch.save will write for obj, near enough: every distinct tensor storage, plus 1 MiB for the pickle,
    the zip records and the small values."""
    storages = {}

    def visit(value) -> None:
        if isinstance(value, torch.Tensor):
            storage = value.untyped_storage()
            storages[(storage.data_ptr(), value.device)] = storage.nbytes()
        elif isinstance(value, dict):
            for item in value.values():
                visit(item)
        elif isinstance(value, (list, tuple)):
            for item in value:
                visit(item)

    visit(obj)
    return sum(storages.values()) + 2**20


def _write_error(path: str, needed: int, cause: str) -> CheckpointWriteError:
    folder = os.path.dirname(os.path.abspath(path))
    free = shutil.disk_usage(folder).free
    return CheckpointWriteError(
        f"could not write checkpoint {path}: {cause}. It needs about {needed:,} bytes ({needed / 2**20:.1f} MiB) and "
        f"{folder} has {free:,} bytes ({free / 2**20:.1f} MiB) free. The previous checkpoint, if any, is intact. Free "
        "disk space (--keep_last N prunes old periodic checkpoints) or point --output_dir at a larger disk, then rerun "
        "the same command to resume.")


def atomic_save(obj, path: str) -> None:
    """torch.save to a temp file, fsync it, rename over `path`, fsync the folder.

    The free space is checked first: torch.save on a full disk fails with an unhelpful zip-writer error, and the
    temp file must fit beside the previous checkpoint, which stays until the rename."""
    folder = os.path.dirname(os.path.abspath(path))
    needed = payload_bytes(obj)
    if shutil.disk_usage(folder).free < needed:
        raise _write_error(path, needed, "not enough free space")
    tmp = f"{path}.tmp.{os.getpid()}"
    try:
        with open(tmp, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as e:
        if os.path.exists(tmp):
            os.remove(tmp)
        if not isinstance(e, (OSError, RuntimeError)):
            raise
        raise _write_error(path, needed, f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else e}") from e
    dir_fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def atomic_copy(src: str, dst: str) -> None:
    """Snapshot src as dst without serialising again. A copy, not a hard link: damage to one file
    must never reach the other."""
    needed = os.path.getsize(src)
    if shutil.disk_usage(os.path.dirname(os.path.abspath(dst))).free < needed:
        raise _write_error(dst, needed, "not enough free space")
    tmp = f"{dst}.tmp.{os.getpid()}"
    try:
        shutil.copyfile(src, tmp)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, dst)
    except BaseException as e:
        if os.path.exists(tmp):
            os.remove(tmp)
        if not isinstance(e, OSError):
            raise
        raise _write_error(dst, needed, e.strerror or str(e)) from e


FORMAT = "medical_mae/1"
PLAIN_TYPES = (int, float, str, bool, list, tuple, type(None))


def assemble(model, optimizer, scaler_state: dict, args, epoch: int, step: int, **extra) -> dict:
    """A checkpoint: the reference's keys first (model, optimizer, epoch, scaler, args), args as a plain dict so it
    loads with weights_only=True, then this project's `extra` (step, rng, world_size, norm_stats, counters)."""
    plain_args = {k: v for k, v in vars(args).items() if isinstance(v, PLAIN_TYPES)}
    return {"model": model.state_dict(), "optimizer": optimizer.state_dict(), "epoch": epoch, "scaler": scaler_state,
            "args": plain_args, "step": step, **extra, "format": FORMAT}


def _numpy_globals() -> list:
    """What a checkpoint pickles when its args or metrics hold numpy values (the reference's misc.save_model stores
    the parsed args, and numpy scalars can end up in them): the scalar constructor, under its numpy 2 name and the
    numpy 1 name older files use, np.dtype, and the dtype classes of the usual numeric types."""
    scalar = np._core.multiarray.scalar
    dtypes = [type(np.dtype(t)) for t in (np.float64, np.float32, np.float16, np.int64, np.int32, np.int16, np.int8,
                                          np.uint8, np.bool_)]
    return [argparse.Namespace, np.dtype, scalar, (scalar, "numpy.core.multiarray.scalar"), *dtypes]


def load_checkpoint(path: str, trust_pickle: bool = False) -> dict:
    """Load with weights_only=True and an allow-list of the plain types checkpoints of this project and the reference
    pickle (argparse.Namespace, numpy scalars and dtypes); args saved as a Namespace come back as a dict.

    trust_pickle (--unsafe_full_unpickle) loads any pickled object instead, which can run code: only for a file the
    user trusts, with a warning."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"checkpoint not found: {path}")
    try:
        if trust_pickle:
            logger.warning("--unsafe_full_unpickle: loading %s with every pickled object allowed; a file from an "
                           "untrusted source can run code this way", path)
            ckpt = torch.load(path, map_location="cpu", weights_only=False)
        else:
            with torch.serialization.safe_globals(_numpy_globals()):
                ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        if "global" not in str(e).lower():  # a damaged or foreign file, not a disallowed object
            # torch's own first line advises weights_only=False, which cannot help a file that is no pickle at all
            reason = re.search(r"WeightsUnpickler error:\s*(.+?)\s*(?:Check the documentation|$)", str(e), re.S)
            raise ValueError(f"{path} is not a readable checkpoint: torch.save did not write it, or it is damaged "
                             f"({reason.group(1) if reason else str(e).splitlines()[0]})") from e
        found = re.search(r"GLOBAL ([\w.]+)", str(e))
        raise UnsafeCheckpointError(
            f"refused to load {path}: it contains objects other than tensors and plain data "
            f"({found.group(1) if found else str(e).splitlines()[0]}), which could run code when unpickled. "
            "Checkpoints of this project and the reference's hold none. If you trust the file, "
            "--unsafe_full_unpickle loads it anyway."
        ) from e
    except (RuntimeError, EOFError, KeyError, zipfile.BadZipFile) as e:  # truncated, or not a torch.save file
        raise ValueError(f"{path} is not a readable checkpoint ({type(e).__name__}: "
                         f"{str(e).splitlines()[0] if str(e) else 'no detail'}); was it copied completely?") from e
    if not isinstance(ckpt, dict):
        raise ValueError(f"{path} holds a {type(ckpt).__name__}, not a checkpoint dict")
    if isinstance(ckpt.get("args"), argparse.Namespace):
        ckpt["args"] = vars(ckpt["args"])
    return ckpt


def rng_state(device: torch.device) -> dict:
    """Every RNG a training step touches, in weights_only-loadable types. CUDA: the training device's generator only
    (the other visible GPUs are not this rank's, and another launcher may show a different number of them)."""
    np_state = np.random.get_state()
    state = {
        "python": random.getstate(),
        "numpy": (np_state[0], torch.from_numpy(np_state[1].astype(np.int64)), *np_state[2:]),
        "torch": torch.get_rng_state(),
    }
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def cuda_state_for(state: dict, local_rank: int) -> torch.Tensor | None:
    """The CUDA generator state to restore on this rank's training device. Checkpoints before this rule saved every
    visible GPU's state in a list; the saving rank's own device was then its local rank."""
    saved = state.get("cuda")
    if isinstance(saved, (list, tuple)):
        if local_rank >= len(saved):
            logger.warning("checkpoint holds CUDA RNG states of %d GPUs, none for local rank %d: the CUDA stream "
                           "restarts from the seed", len(saved), local_rank)
            return None
        return saved[local_rank]
    return saved


def set_rng_state(state: dict, device: torch.device, local_rank: int = 0) -> None:
    random.setstate(_as_python_state(state["python"]))
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(state["torch"])
    cuda = cuda_state_for(state, local_rank)
    if cuda is not None and device.type == "cuda":
        torch.cuda.set_rng_state(cuda, device)
    elif cuda is not None:
        logger.warning("checkpoint has a CUDA RNG state but this run trains on %s: it is not restored", device)


def _as_python_state(state):
    """random.setstate wants tuples; serialisation can hand back lists."""
    version, internal, gauss = state
    return version, tuple(internal), gauss


def progress_of(ckpt: dict) -> tuple[int, int]:
    """(epoch to run next, step inside it). A checkpoint without 'step' marks a finished epoch."""
    step = int(ckpt.get("step", 0) or 0)
    epoch = int(ckpt["epoch"])
    return (epoch, step) if step > 0 else (epoch + 1, 0)


def candidates(output_dir: str) -> list[str]:
    """Checkpoints in output_dir, newest first (by modification time)."""
    paths = [p for p in glob.glob(os.path.join(output_dir, "checkpoint-*.pth")) if os.path.isfile(p)]
    return sorted(paths, key=lambda p: (os.path.getmtime(p), p == os.path.join(output_dir, LAST_NAME)), reverse=True)


def find_resumable(output_dir: str) -> tuple[str, dict] | None:
    """The newest checkpoint that loads; damaged ones are reported and passed over."""
    for path in candidates(output_dir):
        try:
            return path, load_checkpoint(path)
        except (RuntimeError, EOFError, ValueError, KeyError, zipfile.BadZipFile, OSError) as e:
            if isinstance(e, UnsafeCheckpointError):
                raise
            logger.warning("checkpoint %s is damaged (%s); trying the previous one", path, str(e).splitlines()[0])
    return None


def remove_stale_temp_files(output_dir: str) -> None:
    """Temp files left by a save that was killed are never read; remove them."""
    for tmp in glob.glob(os.path.join(output_dir, "checkpoint-*.pth.tmp.*")):
        logger.info("removing %s, left by an interrupted save", tmp)
        os.remove(tmp)


def prune_periodic(output_dir: str, keep_last: int) -> None:
    """Keep the newest `keep_last` checkpoint-{epoch}.pth files; 0 keeps all (the reference behaviour)."""
    if keep_last <= 0:
        return
    periodic = []
    for path in glob.glob(os.path.join(output_dir, "checkpoint-*.pth")):
        match = _PERIODIC.search(os.path.basename(path))
        if match:
            periodic.append((int(match.group(1)), path))
    for _, path in sorted(periodic)[:-keep_last]:
        os.remove(path)
        logger.info("pruned %s (--keep_last %d)", path, keep_last)


def check_writable(output_dir: str) -> None:
    """Probe write, so an unwritable or full disk fails before any compute is spent."""
    if os.path.exists(output_dir) and not os.path.isdir(output_dir):
        raise SetupError(f"--output_dir {output_dir} is a file, not a folder; give a folder (it is created if "
                           "missing)")
    try:
        os.makedirs(output_dir, exist_ok=True)
        probe = os.path.join(output_dir, f".write_probe.{os.getpid()}")
        with open(probe, "wb") as f:
            f.write(b"\0" * 4096)
            f.flush()
            os.fsync(f.fileno())
        os.remove(probe)
    except OSError as e:
        raise SetupError(f"--output_dir {output_dir} is not writable: {e.strerror or e}. "
                           "Choose a folder on a disk with free space that this user can write.") from e
