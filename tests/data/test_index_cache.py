"""The index cache in output_dir (data/index_cache.py) and the index shared by rank 0 (engine_pretrain.index_pool)."""
import glob
import logging
import os
import pickle
import shutil
import subprocess
import sys
import textwrap
import time
from unittest import mock

import numpy as np
import pytest

import data
from data import index_cache
from data.base import BadImageError
from data.synthetic import make_reference_layout
from tests.helpers import ROOT, VIT_SCRIPT, child_env, nih_subset, run_cli, tiny_run_args

SOURCES = ["chexpert", "chestxray_nih", "mimic_cxr"]


@pytest.fixture
def tree(tmp_path):
    """A fresh tiny tree per test (the tests change it) and an output_dir."""
    data_path = tmp_path / "data"
    counts = make_reference_layout(str(data_path), size=(40, 48))
    out = tmp_path / "out"
    out.mkdir()
    return str(data_path), str(out), counts


def cfg(data_path: str, **overrides):
    return data.data_config(datasets_names=SOURCES, data_path=data_path, train_list=nih_subset(data_path),
                            **overrides)


def image_stats(call, data_path: str) -> int:
    """How many os.stat calls (os.path.isfile, exists, ...) `call` makes on image files under data_path."""
    real_stat, root, seen = os.stat, os.fsencode(os.path.abspath(data_path)), []

    def counting_stat(path, *args, **kwargs):
        raw = os.fsencode(path) if isinstance(path, (str, bytes)) else b""
        if raw.startswith(root) and raw.endswith((b".jpg", b".png")):
            seen.append(raw)
        return real_stat(path, *args, **kwargs)

    with mock.patch("os.stat", counting_stat):
        call()
    return len(seen)


def test_restart_reads_the_cache_and_stats_no_image(tree):
    data_path, out, counts = tree
    first = []
    stats_first = image_stats(lambda: first.append(data.build_index_pool(cfg(data_path), out)), data_path)
    assert first[0].origin.startswith("built and checked")
    assert stats_first >= sum(counts.values())  # every image checked once
    again = []
    assert image_stats(lambda: again.append(data.build_index_pool(cfg(data_path), out)), data_path) == 0
    assert again[0].origin.startswith("read from")
    for a, b in zip(first[0].indexes, again[0].indexes):
        assert a.name == b.name and a.filters == b.filters and a.held_out_patients == b.held_out_patients
        np.testing.assert_array_equal(a.paths, b.paths)
        np.testing.assert_array_equal(a.patients, b.patients)
        np.testing.assert_array_equal(a.views, b.views)
        assert (a.labels is None) == (b.labels is None)
        if a.labels is not None:
            np.testing.assert_array_equal(a.labels, b.labels)
    counts_tree = data.count_tree(again[0].indexes, again[0].origin)
    assert "index read from" in data.format_count_tree(counts_tree)


def test_a_changed_input_or_data_flag_rebuilds(tree):
    data_path, out, _ = tree
    assert data.build_index_pool(cfg(data_path), out).origin.startswith("built")
    assert data.build_index_pool(cfg(data_path), out).origin.startswith("read from")
    # a metadata file rewritten (new mtime), a data flag, the forcing flag
    train_csv = os.path.join(data_path, "CheXpert-v1.0-small", "train.csv")
    later = time.time() + 5
    os.utime(train_csv, (later, later))
    assert data.build_index_pool(cfg(data_path), out).origin.startswith("built")
    assert data.build_index_pool(cfg(data_path), out).origin.startswith("read from")
    assert data.build_index_pool(cfg(data_path, views=["chexpert=all"]), out).origin.startswith("built")
    assert data.build_index_pool(cfg(data_path), out).origin.startswith("built")  # the flag went back
    assert data.build_index_pool(cfg(data_path, rebuild_index=True), out).origin == (
        f"built and checked (--rebuild_index); cached in {os.path.join(out, index_cache.CACHE_NAME)}")
    # an image added to an NIH image folder changes that folder's mtime
    folder = os.path.join(data_path, "nih_chestxray", "images")
    shutil.copy(glob.glob(os.path.join(folder, "*.png"))[0], os.path.join(folder, "00099999_000.png"))
    assert data.build_index_pool(cfg(data_path), out).origin.startswith("built")


class _Planted:
    """Unpickling this would create a file: the cache must never unpickle."""

    marker = ""

    def __reduce__(self):
        return open, (self.marker, "w")


def test_a_corrupt_or_foreign_cache_is_rebuilt_never_trusted(tree, caplog):
    data_path, out, counts = tree
    path = os.path.join(out, index_cache.CACHE_NAME)
    open(path + ".tmp.999999", "wb").close()  # left by a writer that was killed
    data.build_index_pool(cfg(data_path), out)
    good = open(path, "rb").read()
    marker = os.path.join(out, "unpickled")
    _Planted.marker = marker
    with open(os.path.join(out, "planted.pkl"), "wb") as f:
        pickle.dump(_Planted(), f)
    planted = {  # truncated; not a zip; another key; an object array that needs pickle
        "truncated": good[: len(good) // 2],
        "garbage": b"not an npz at all",
        "foreign": index_cache.encode(data.build_indexes(cfg(data_path)), {"format": index_cache.FORMAT}),
        "pickled": None,
    }
    for name, payload in planted.items():
        if payload is None:
            np.savez(path, header=np.frombuffer(good[:0], np.uint8), **{"0.paths": np.array([_Planted()], object)})
        else:
            with open(path, "wb") as f:
                f.write(payload)
        caplog.clear()
        with caplog.at_level(logging.INFO, logger="data.index_cache"):
            pool = data.build_index_pool(cfg(data_path), out)
        assert pool.origin.startswith("built and checked"), name
        assert "not used" in caplog.text and "rebuilding" in caplog.text, name
        assert sum(len(i) for i in pool.indexes) == sum(counts.values())
        assert not os.path.exists(marker), name
        assert data.build_index_pool(cfg(data_path), out).origin.startswith("read from"), name  # rewritten
    assert not glob.glob(path + ".tmp*")


def test_an_image_deleted_after_caching_meets_the_bad_files_policy(tree):
    data_path, out, _ = tree
    data.build_index_pool(cfg(data_path), out)
    victim = data.build_index_pool(cfg(data_path), out).indexes[0].paths[0].decode()
    os.remove(victim)  # its study folder changes, not a declared input: the cache still holds it
    pool = data.build_index_pool(cfg(data_path), out)
    assert pool.origin.startswith("read from")
    chexpert = data.build_pretrain_data(cfg(data_path), monitor=False, pool=pool).dataset.datasets[0]
    with pytest.raises(BadImageError, match=os.path.basename(victim)):
        chexpert[0]
    # --bad_files skip is another key: the index is rebuilt, and the missing file is left out and counted
    pool = data.build_index_pool(cfg(data_path, bad_files="skip"), out)
    assert pool.origin.startswith("built")
    assert pool.indexes[0].filters[-1] == ("files present", len(pool.indexes[0]))
    assert victim.encode() not in pool.indexes[0].paths


def test_paths_with_non_ascii_characters_are_kept(tmp_path):
    root = tmp_path / "Röntgen" / "patientÄ"
    root.mkdir(parents=True)
    from data.synthetic import chest_image, save_image
    save_image(str(root / "bild_ü.png"), chest_image(40, 40, seed=1))
    idx = data.build_indexes(data.data_config(datasets_names=["folder"], folder_root=str(tmp_path / "Röntgen"),
                                              startup_check=1))[0]
    assert idx.paths[0].decode() == str(root / "bild_ü.png") and idx.patients[0].decode() == "patientÄ"


def test_threaded_file_check_matches_the_serial_one(tree):
    data_path, _, _ = tree
    paths = np.concatenate([i.paths for i in data.build_indexes(cfg(data_path))])
    copies = 1 + 3 * data.STAT_CHUNK // len(paths)  # several chunks
    paths = np.concatenate([paths, np.array([b"/nonexistent/a.jpg"] * 3)]).repeat(copies)
    serial = data.files_exist(paths, threads=1)
    assert serial.sum() == len(paths) - 3 * copies
    np.testing.assert_array_equal(data.files_exist(paths, threads=8), serial)


SPY = '''
import atexit, os
_real_stat, _root, _main, _count = os.stat, os.fsencode(os.environ["SPY_ROOT"]), os.getpid(), [0]

def _stat(path, *args, **kwargs):
    raw = os.fsencode(path) if isinstance(path, (str, bytes)) else b""
    if os.getpid() == _main and raw.startswith(_root) and raw.endswith((b".jpg", b".png")):
        _count[0] += 1
    return _real_stat(path, *args, **kwargs)

os.stat = _stat
if "RANK" in os.environ:  # a training process (not torchrun's agent); its DataLoader workers have another pid
    atexit.register(lambda: os.getpid() == _main and open(os.path.join(os.environ["SPY_OUT"],
                    "rank" + os.environ["RANK"]), "w").write(str(_count[0])))
'''


def _torchrun(tmp_path, data_path, out, port, **overrides):
    spy = tmp_path / "spy"
    spy.mkdir(exist_ok=True)
    (spy / "sitecustomize.py").write_text(textwrap.dedent(SPY))
    counts = tmp_path / "counts"
    shutil.rmtree(counts, ignore_errors=True)
    counts.mkdir()
    env = child_env(PYTHONPATH=f"{spy}{os.pathsep}{ROOT}", SPY_ROOT=os.path.abspath(data_path), SPY_OUT=counts)
    flags = {"num_workers": 1, "max_steps_per_epoch": 2, **overrides}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={port}", VIT_SCRIPT,
           *tiny_run_args(data_path, out, **flags)]
    return cmd, env, counts


@pytest.mark.slow
def test_only_rank0_touches_the_image_files_under_torchrun(tree, tmp_path, free_port):
    data_path, out, counts = tree
    pool = sum(counts.values())
    for start in ("first", "restart"):
        cmd, env, spied = _torchrun(tmp_path, data_path, out, free_port, epochs=1 if start == "first" else 2)
        proc = run_cli(cmd, env=env, timeout=300)
        stats = {p.name: int(p.read_text()) for p in spied.iterdir()}
        assert set(stats) == {"rank0", "rank1"}, proc.output
        assert stats["rank1"] == 0, proc.output  # rank 1 received rank 0's index
        if start == "first":
            assert pool <= stats["rank0"] <= pool + 16, proc.output  # each image once (+ monitor images)
            assert f"index built and checked; cached in {out}" in proc.stdout + proc.stderr
        else:
            assert stats["rank0"] <= 16, proc.output  # a few monitor images at most, no per-image check
            assert "index read from" in proc.stdout + proc.stderr
        assert "start-up: first optimizer step" in proc.stdout + proc.stderr


@pytest.mark.slow
def test_rank0_index_failure_stops_the_other_rank_at_once(tree, tmp_path, free_port):
    data_path, out, _ = tree
    os.remove(os.path.join(data_path, "CheXpert-v1.0-small", "train.csv"))
    cmd, env, _ = _torchrun(tmp_path, data_path, out, free_port, dist_timeout=600)
    # rank 1 is told rank 0's error: it does not wait for the 600 s collective timeout (the 300 s bound is generous)
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode != 0
    text = proc.stdout + proc.stderr
    assert "train.csv not found" in text
    assert "[rank1]" in text and "rank 0 failed: FileNotFoundError" in text


def test_every_source_declares_its_metadata_as_inputs(tmp_path):
    """A source's metadata file edited in place changes no folder's mtime: each must be a declared input."""
    from data.synthetic import make_padchest, make_vindr

    make_reference_layout(str(tmp_path), size=(40, 48))
    make_padchest(str(tmp_path / "padchest"))
    make_vindr(str(tmp_path / "vindr_cxr"))
    (tmp_path / "folder" / "p1").mkdir(parents=True)
    config = data.data_config(data_path=str(tmp_path), train_list=nih_subset(str(tmp_path)))
    declared = {name: set(source.inputs(config)) for name, source in data.SOURCES.items()}
    assert {os.path.join(str(tmp_path), "CheXpert-v1.0-small", f) for f in ("train.csv", "valid.csv")} <= declared[
        "chexpert"]
    nih = os.path.join(str(tmp_path), "nih_chestxray")
    assert {nih_subset(str(tmp_path)), os.path.join(nih, "Data_Entry_2017_v2020.csv"),
            os.path.join(nih, "test_list.txt"), os.path.join(nih, "images")} <= declared["chestxray_nih"]
    mimic = os.path.join(str(tmp_path), "mimic_cxr")
    assert {os.path.join(mimic, f"mimic-cxr-2.0.0-{t}.csv.gz") for t in ("metadata", "split", "chexpert")} <= declared[
        "mimic_cxr"]
    assert any(p.endswith("PADCHEST_chest_x_ray_images_labels_160K_01.02.19.csv.gz") for p in declared["padchest"])
    assert {os.path.join(str(tmp_path), "vindr_cxr", d) for d in ("train", "test")} <= declared["vindr_cxr"]
    assert os.path.join(str(tmp_path), "folder", "p1") in declared["folder"]
