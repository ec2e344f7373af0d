"""tools/compute_norm_stats: a JSON that --norm_stats accepts."""
import json

import data
from tests.helpers import nih_subset, run_tool_in_process


def test_compute_norm_stats_writes_usable_json(tmp_path, tiny_data):
    out = tmp_path / "stats.json"
    proc = run_tool_in_process("compute_norm_stats.py", "--data_path", tiny_data[0], "--datasets_names", "chexpert",
                     "chestxray_nih", "--input_size", "32", "--out", str(out), "--train_list", nih_subset(tiny_data[0]))
    assert proc.returncode == 0, proc.stderr
    ds, _ = data.build_pretrain_dataset(["chexpert"], data_path=tiny_data[0], norm_stats=str(out), input_size=32)
    normalize = ds.datasets[0].transform.transforms[-1]
    stats = json.loads(out.read_text())
    assert 0 < stats["mean"] < 1 and 0 < stats["std"] < 1 and normalize.mean == [stats["mean"]] * 3
