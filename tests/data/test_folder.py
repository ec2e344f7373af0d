"""data/folder.py: a folder tree or a list file."""
import numpy as np

import data
from data.synthetic import (
    chest_image,
    save_image,
    write_dicom,
)


def test_folder_source_tree_and_list(tmp_path):
    root = tmp_path / "mine"
    save_image(str(root / "p1" / "a.png"), chest_image(32, 32, 1))
    save_image(str(root / "p1" / "b.jpg"), chest_image(32, 32, 2))
    write_dicom(str(root / "p2" / "c.dcm"), (chest_image(32, 32, 3).astype(np.uint16) * 16))
    ds, counts = data.build_pretrain_dataset(["folder"], folder_root=str(root), input_size=32)
    assert len(ds) == 3 and counts["folder"]["patients"] == 2
    listing = tmp_path / "list.txt"
    listing.write_text("mine/p1/a.png,alice\nmine/p2/c.dcm,bob\n")
    ds, counts = data.build_pretrain_dataset(["folder"], folder_list=str(listing), input_size=32)
    assert len(ds) == 2 and counts["folder"]["patients"] == 2
    assert all(x.shape == (3, 32, 32) for x, _ in (ds[(i, i)] for i in range(2)))
