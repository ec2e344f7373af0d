"""VinDr-CXR (Nguyen et al., Scientific Data 2022), Vingroup Big Data Institute.

PhysioNet layout <root>/train/<image_id>.dicom (15,000) and <root>/test/<image_id>.dicom (3,000); the
Kaggle competition copy has the same train/ and test/ folders. Pre-training uses train/ only; test/
is the evaluation set. DICOMs are decoded with the modality LUT, VOI LUT/window and MONOCHROME1
inversion (data/image_io.py), including files that lack file meta (vindr-cxr issue #3).
The release has no patient ids, so each image is its own patient.
"""
import glob
import os

import numpy as np

from data.base import MONITOR_IMAGES, Source, SourceIndex


def _dicoms(folder: str) -> list[str]:
    return sorted(p for ext in ("*.dicom", "*.dcm") for p in glob.glob(os.path.join(glob.escape(folder), ext)))


class VinDrCXR(Source):
    name = "vindr_cxr"
    default_dir = "vindr_cxr"

    def inputs(self, args) -> list[str]:
        root = self.resolve_root(args)
        return [root, *(f for f in (os.path.join(root, "train"), os.path.join(root, "test")) if os.path.isdir(f))]

    def index(self, args) -> SourceIndex:
        root = self.resolve_root(args)
        train = os.path.join(root, "train")
        paths = _dicoms(train)
        if not paths:
            raise FileNotFoundError(f"vindr_cxr: no .dicom files in {train}")
        ids = [os.path.splitext(os.path.basename(p))[0] for p in paths]
        idx = SourceIndex(self.name, root, paths, ids, np.full(len(paths), ""), filters=[("train/", len(paths))])
        test = _dicoms(os.path.join(root, "test"))
        idx.held_out_patients = {os.path.splitext(os.path.basename(p))[0] for p in test}
        idx.held_out_name = "test/"
        idx.monitor_paths = test[:MONITOR_IMAGES]
        return idx
