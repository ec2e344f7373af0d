"""data/prepared.py and tools/prepare_data: the memmap format, resume, checksums."""
import os
import sys

import pytest
import torch
from PIL import Image

import data
from data.prepared import PreparedStore
from data.synthetic import chest_image
from tests.helpers import (
    VIT_SCRIPT,
    child_env,
    default_data_args,
    nih_subset,
    run_cli,
    tiny_run_args,
    training_checkpoint,
)


def _prepare(data_path, out, *extra):
    return run_cli([sys.executable, "-m", "tools.prepare_data", "--data_path", data_path,
                    "--datasets_names", "chexpert", "chestxray_nih", "mimic_cxr", "--out", out, "--workers", "1",
                    "--shard_images", "8", "--train_list", nih_subset(data_path), *extra], env=child_env())


@pytest.mark.slow
def test_prepared_gives_same_sample_set_and_resumes(tiny_data, tmp_path):
    out = str(tmp_path / "prep")
    _prepare(tiny_data[0], out)
    store = PreparedStore(out)
    assert store.verify() == [] and len(store.manifest["shards"]) == 4
    names = ["chexpert", "chestxray_nih", "mimic_cxr"]
    original, counts = data.build_pretrain_dataset(names, data_path=tiny_data[0], input_size=32,
                                                   train_list=nih_subset(tiny_data[0]))
    prepared, prepared_counts = data.build_pretrain_dataset(names, prepared_dir=out, input_size=32)
    for a, b in zip(original.datasets, prepared.datasets, strict=True):
        assert a.name == b.name and list(a.paths) == list(b.paths)
    assert {k: v["images"] for k, v in counts.items()} == {k: v["images"] for k, v in prepared_counts.items()}
    torch.testing.assert_close(original[(5, 9)][0], prepared[(5, 9)][0])  # fixture images are below 320 px
    # an interruption: the last shard and the manifest are gone; the same command finishes the job
    kept = {name: os.stat(os.path.join(out, name)).st_mtime_ns for name in os.listdir(out) if name.startswith("shard_")
            and not name.startswith("shard_00003")}
    os.remove(os.path.join(out, "manifest.json"))
    os.remove(os.path.join(out, "shard_00003.npz"))
    proc = _prepare(tiny_data[0], out)
    assert "(shard 4/4)" in proc.stderr + proc.stdout and PreparedStore(out).verify() == []
    # the finished shards were kept as they were, not written again
    assert {name: os.stat(os.path.join(out, name)).st_mtime_ns for name in kept} == kept and len(kept) >= 6


@pytest.mark.slow
def test_prepared_detects_corrupt_shard_and_other_inputs(tiny_data, tmp_path):
    out = str(tmp_path / "prep")
    _prepare(tiny_data[0], out)
    with open(os.path.join(out, "shard_00001.u8"), "r+b") as f:
        f.write(b"\xff\xff\xff")
    assert PreparedStore(out).verify() == ["shard_00001.u8"]
    check = run_cli([sys.executable, "-m", "tools.prepare_data", "--out", out, "--verify"], expect_rc=1)
    assert "checksum mismatch: shard_00001.u8" in check.stdout
    proc = run_cli([sys.executable, "-m", "tools.prepare_data", "--data_path", tiny_data[0],
                    "--datasets_names", "chexpert", "--out", out], expect_rc=None)
    assert proc.returncode != 0 and "holds a preparation of other inputs" in proc.stdout + proc.stderr


@pytest.mark.slow
def test_prepared_resizes_shorter_side(tmp_path):
    folder = tmp_path / "data" / "folder"
    folder.mkdir(parents=True)
    for i, (h, w) in enumerate([(700, 600), (300, 1000)]):
        Image.fromarray(chest_image(h, w, seed=i)).save(folder / f"{i}.jpg", quality=95)
    args = default_data_args()
    args.datasets_names, args.data_path = ["folder"], str(tmp_path / "data")
    data.prepared.prepare(data.build_indexes(args), str(tmp_path / "prep"), size=320)
    store = PreparedStore(str(tmp_path / "prep"))
    sizes = sorted(zip(store.columns["height"].tolist(), store.columns["width"].tolist()))
    assert sizes == [(300, 1000), (373, 320)]  # shorter side 320; smaller images are not enlarged
    assert sorted(map(tuple, store.columns["original"].tolist())) == [(600, 700), (1000, 300)]


@pytest.mark.slow
def test_training_from_prepared_dir(tiny_data, tmp_path):
    out = str(tmp_path / "prep")
    _prepare(tiny_data[0], out)
    run = str(tmp_path / "run")
    proc = run_cli([sys.executable, VIT_SCRIPT, *tiny_run_args("/nonexistent", run, prepared_dir=out)])
    assert "prepared: " in proc.stdout, proc.output
    training_checkpoint(os.path.join(run, "checkpoint-0.pth"), epoch=0, world_size=1)
