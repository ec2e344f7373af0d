"""NIH ChestX-ray14 (Wang et al., CVPR 2017), NIH Clinical Center.

Images are found with no configuration in either layout:
  flat:   <root>/images/00000001_000.png           (the NIH box download, tarballs extracted)
  nested: <root>/images_001/images/00000001_000.png (the Kaggle copy)
The training list is --train_list (reference format "name label..." or plain names), by default the
reference's data_splits/chestxray/train_official.txt shipped with this project (75,312 images, as the
paper pre-trains). The other 11,212 images of the download's train_val_list.txt form val_official.txt,
the fine-tuning validation set; the 25,596 of test_list.txt (= test_official.txt) are the test set. The
three lists are patient-disjoint, and the leakage guard holds out the patients of val_official.txt and
test_list.txt. Patient id = the first 8 digits of the file name. View positions (AP/PA) come from
Data_Entry_2017_v2020.csv or Data_Entry_2017.csv when present, for --views chestxray_nih=PA. Findings
labels (for the optional probe) come from the list when it has them, else from Data_Entry.
"""
import glob
import os

import numpy as np
import pandas as pd

from data.base import MONITOR_IMAGES, Source, SourceIndex, find_given_file, require_columns, require_file

DATA_ENTRY_FILES = ("Data_Entry_2017_v2020.csv", "Data_Entry_2017.csv")
# the reference's split lists (lambert-x/medical_mae data_splits/chestxray/), shipped with the project
PROJECT_DIR = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
OFFICIAL_SPLITS_DIR = os.path.join(PROJECT_DIR, "data_splits", "chestxray")
DEFAULT_TRAIN_LIST = os.path.join(OFFICIAL_SPLITS_DIR, "train_official.txt")
VAL_LIST = os.path.join(OFFICIAL_SPLITS_DIR, "val_official.txt")
TEST_LIST = os.path.join(OFFICIAL_SPLITS_DIR, "test_official.txt")


def _list_rows(path: str) -> list[list[str]]:
    """The whitespace-separated fields of every non-empty line."""
    with open(path, encoding="utf-8") as f:
        return [fields for line in f if (fields := line.split())]


def read_list(path: str) -> tuple[list[str], np.ndarray | None]:
    """Names and, when every line is "name label x14", the [N, 14] labels (else None)."""
    rows = _list_rows(path)
    names = [row[0] for row in rows]
    if rows and all(len(row) == 1 + len(FINDINGS) for row in rows):
        return names, np.array([row[1:] for row in rows], dtype=np.float32)
    return names, None


def read_name_list(path: str) -> list[str]:
    """First token of every non-empty line ("name label label ..." or just "name"); labels are not parsed."""
    with open(path, encoding="utf-8") as f:
        return [fields[0] for line in f if (fields := line.split(maxsplit=1))]


def image_folders(root: str) -> list[str]:
    """<root>/images and <root>/images_*/images, those that exist."""
    folders = [os.path.join(root, "images"), *sorted(glob.glob(os.path.join(glob.escape(root), "images_*", "images")))]
    return [f for f in folders if os.path.isdir(f)]


def image_locations(root: str) -> dict[str, str]:
    """file name -> path over <root>/images, <root>/images_*/images and <root> itself."""
    found = {}
    for folder in [*image_folders(root), root]:
        if os.path.isdir(folder):
            with os.scandir(folder) as entries:
                for entry in entries:
                    if entry.name.endswith(".png") and entry.name not in found:
                        found[entry.name] = entry.path
    return found


def find_list(given: str, root: str, flag: str) -> str:
    """A list file named on the command line, looked up in the working directory, the NIH folder and the project."""
    return find_given_file(given, flag, root, PROJECT_DIR)


FINDINGS = ["Atelectasis", "Cardiomegaly", "Effusion", "Infiltration", "Mass", "Nodule", "Pneumonia", "Pneumothorax",
            "Consolidation", "Edema", "Emphysema", "Fibrosis", "Pleural_Thickening", "Hernia"]


def data_entry(root: str) -> dict[str, tuple[str, str]]:
    """Image Index -> (View Position, Finding Labels) from Data_Entry_2017[_v2020].csv, if present.

    Columns are taken by name: the 2017 file's trailing commas add an empty column, and a re-release
    renamed Patient Gender to Patient Sex; neither matters here.
    """
    for name in DATA_ENTRY_FILES:
        path = os.path.join(root, name)
        if os.path.isfile(path):
            df = pd.read_csv(path, dtype=str, keep_default_na=False, index_col=False)
            require_columns(df, ["Image Index", "View Position", "Finding Labels"], path)
            columns = (df[c].to_numpy() for c in ("Image Index", "View Position", "Finding Labels"))
            names, views, findings = columns
            return dict(zip(names, zip(np.strings.strip(views.astype(str)).tolist(), findings)))
    return {}


def view_positions(root: str) -> dict[str, str]:
    return {name: view for name, (view, _) in data_entry(root).items()}


def patient_of(name: str) -> str:
    return os.path.basename(name)[:8]


class ChestXrayNIH(Source):
    name = "chestxray_nih"
    default_dir = "nih_chestxray"

    @classmethod
    def add_args(cls, group) -> None:
        group.add_argument("--train_list", default=None, type=str,
                           help="NIH list file of training images (name [labels] per line), looked up in the working "
                                "directory, the NIH folder and the project; default: the reference's "
                                "data_splits/chestxray/train_official.txt (75,312 images, shipped with the project)")

    def list_file(self, args, root: str) -> str:
        given = args.train_list
        if not given:
            return require_file(DEFAULT_TRAIN_LIST, self.name, "the shipped data_splits/chestxray/train_official.txt")
        return find_list(given, root, "--train_list")

    def inputs(self, args) -> list[str]:
        root = self.resolve_root(args)
        files = [self.list_file(args, root), VAL_LIST, TEST_LIST, *(os.path.join(root, n) for n in
                                                                      (*DATA_ENTRY_FILES, "test_list.txt"))]
        return [root, *image_folders(root), *(f for f in files if os.path.isfile(f))]

    def index(self, args) -> SourceIndex:
        root = self.resolve_root(args)
        list_path = self.list_file(args, root)
        names, list_labels = read_list(list_path)
        located = image_locations(root)
        paths = [located.get(n) or os.path.join(root, "images", n) for n in names]
        entries = data_entry(root)
        views = [entries[n][0] if n in entries else "" for n in names]
        idx = SourceIndex(self.name, root, paths, [patient_of(n) for n in names], views,
                          filters=[(os.path.basename(list_path), len(names))])
        if list_labels is not None:
            idx.labels = list_labels
        elif entries and all(n in entries for n in names):
            found = [set(entries[n][1].split("|")) for n in names]
            idx.labels = np.array([[f in row for f in FINDINGS] for row in found], dtype=np.float32)
        # held out: the fine-tuning validation patients and the test patients (the download's list if present)
        test_list = os.path.join(root, "test_list.txt")
        if not os.path.isfile(test_list):
            test_list = TEST_LIST  # the same 25,596 names
        test_names = read_name_list(test_list)
        idx.held_out_patients = {patient_of(n) for n in [*read_name_list(VAL_LIST), *test_names]}
        idx.held_out_name = f"val_official.txt + {os.path.basename(test_list)}"
        idx.monitor_paths = [located[n] for n in test_names if n in located][:MONITOR_IMAGES]
        return idx
