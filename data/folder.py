"""A user's own collection: a folder tree, or a list file of image paths.

--folder_root DIR   every .png/.jpg/.jpeg/.dcm/.dicom below DIR (patient = the first folder level below DIR)
--folder_list FILE  one image per line, "path" or "path,patient_id"; relative paths are taken from FILE's folder
PNG (8- or 16-bit), JPEG and DICOM are all read by data/image_io.py.
"""
import os

import numpy as np

from data.base import Source, SourceIndex

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".dcm", ".dicom")


class Folder(Source):
    name = "folder"
    default_dir = "folder"

    @classmethod
    def add_args(cls, group) -> None:
        group.add_argument("--folder_list", default=None, type=str,
                           help="for the 'folder' source: a file listing image paths (path[,patient] per line) "
                                "instead of scanning --folder_root")

    def inputs(self, args) -> list[str]:
        if args.folder_list:
            return [args.folder_list] if os.path.isfile(args.folder_list) else []
        root = self.resolve_root(args)  # every folder of the tree: adding or removing a file changes its folder's mtime
        return [folder for folder, _, _ in os.walk(root)]

    def index(self, args) -> SourceIndex:
        list_file = args.folder_list
        if list_file:
            return self._from_list(list_file)
        root = self.resolve_root(args)
        paths, patients = [], []
        for folder, dirs, files in os.walk(root):
            dirs.sort()
            for f in sorted(files):
                if f.lower().endswith(IMAGE_EXTENSIONS):
                    path = os.path.join(folder, f)
                    rel = os.path.relpath(path, root).split(os.sep)
                    paths.append(path)
                    patients.append(rel[0] if len(rel) > 1 else os.path.splitext(f)[0])
        if not paths:
            raise FileNotFoundError(f"folder: no {', '.join(IMAGE_EXTENSIONS)} files below {root}")
        return SourceIndex(self.name, root, paths, patients, np.full(len(paths), ""), filters=[("files", len(paths))])

    def _from_list(self, list_file: str) -> SourceIndex:
        if not os.path.isfile(list_file):
            raise FileNotFoundError(f"--folder_list {list_file} not found")
        base = os.path.dirname(os.path.abspath(list_file))
        paths, patients = [], []
        with open(list_file, encoding="utf-8") as f:
            for line in f:
                if not line.strip():
                    continue
                path, _, patient = line.strip().partition(",")
                path = path if os.path.isabs(path) else os.path.join(base, path)
                paths.append(path)
                patients.append(patient.strip() or os.path.splitext(os.path.basename(path))[0])
        return SourceIndex(self.name, base, paths, patients, np.full(len(paths), ""),
                           filters=[(os.path.basename(list_file), len(paths))])
