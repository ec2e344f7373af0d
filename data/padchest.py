"""PadChest (Bustos et al., Medical Image Analysis 2020), BIMCV / Hospital San Juan, Alicante.

<root>/PADCHEST_chest_x_ray_images_labels_160K_01.02.19.csv[.gz] (36 columns, leading unnamed index)
and the images as 16-bit PNGs, either in <root>/<ImageDir>/<ImageID> (one folder per zip) or flat in
<root>/<ImageID>. Pre-training keeps Projection PA, AP and AP_horizontal (110,633 of 160,861 rows);
rows whose Labels contain 'exclude' are dropped. 16-bit pixels are scaled per image (data/image_io.py).
There is no official test split, so the leakage guard has nothing to check for this source.
"""
import ast
import glob
import os

import pandas as pd

from data.base import Source, SourceIndex, require_columns

CSV_STEM = "PADCHEST_chest_x_ray_images_labels_160K_01.02.19"


def _has_exclude(labels: str) -> bool:
    try:
        parsed = ast.literal_eval(labels) if labels else []
    except (ValueError, SyntaxError):
        return False
    return any(str(item).strip() == "exclude" for item in parsed)


class PadChest(Source):
    name = "padchest"
    default_dir = "padchest"
    default_views = ("PA", "AP", "AP_horizontal")

    @staticmethod
    def _csvs(root: str) -> list[str]:
        return [p for ext in (".csv.gz", ".csv") for p in glob.glob(os.path.join(glob.escape(root), CSV_STEM + ext))]

    def inputs(self, args) -> list[str]:
        root = self.resolve_root(args)
        return [root, *self._csvs(root)]

    def index(self, args) -> SourceIndex:
        root = self.resolve_root(args)
        found = self._csvs(root)
        if not found:
            raise FileNotFoundError(f"padchest: {CSV_STEM}.csv[.gz] not found in {root}")
        csv = found[0]
        df = pd.read_csv(csv, dtype=str, keep_default_na=False, low_memory=False)
        require_columns(df, ["ImageID", "ImageDir", "PatientID", "Projection"], csv)
        n_all = len(df)
        if "Labels" in df.columns:
            df = df[~df["Labels"].map(_has_exclude)]
        nested = [os.path.join(root, d, i) for d, i in zip(df["ImageDir"], df["ImageID"])]
        paths = [n if os.path.isfile(n) else os.path.join(root, i) for n, i in zip(nested, df["ImageID"])]
        return SourceIndex(self.name, root, paths, df["PatientID"].to_numpy(), df["Projection"].str.strip().to_numpy(),
                           filters=[(os.path.basename(csv), n_all), ("Labels without 'exclude'", len(df))])
