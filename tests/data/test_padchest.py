"""data/padchest.py: the Projection filter, both layouts, 16-bit PNGs."""
import pytest

import data
from data.synthetic import (
    make_padchest,
)


@pytest.mark.parametrize("flat", [False, True])
def test_padchest_projection_filter_and_layouts(tmp_path, flat):
    expected = make_padchest(str(tmp_path / "padchest"), flat=flat)
    ds, counts = data.build_pretrain_dataset(["padchest"], data_path=str(tmp_path), input_size=32)
    assert len(ds) == expected
    assert counts["padchest"]["filters"][-1][0] == "views PA,AP,AP_horizontal"
    x, _ = ds[(0, 1)]
    assert x.shape == (3, 32, 32) and float(x.std()) > 0.1  # 16-bit pixels scaled, not a white frame
