"""The patient-level leakage guard: no pre-training image may belong to a patient of its source's own held-out split.

Each source declares its held-out patients on its SourceIndex (NIH val_official + test_list, CheXpert valid.csv,
MIMIC validate/test, VinDr test/); a hit stops the run before any compute, with a report. --no_leakage_check turns it
off.
"""
import numpy as np

from data.base import SourceIndex
from util.errors import SetupError


class DataLeakageError(SetupError):
    """Pre-training images belong to patients of a source's own test or validation split."""


def check_leakage(indexes: list[SourceIndex]) -> None:
    """Raise DataLeakageError if any source pre-trains on a patient of its own held-out split."""
    report = []
    for idx in indexes:
        if not idx.held_out_patients:
            continue
        held = np.array(sorted(idx.held_out_patients), dtype=np.bytes_)
        leaked = np.isin(idx.patients, held)
        if leaked.any():
            patients = sorted({p.decode() for p in idx.patients[leaked]})
            report.append(f"  {idx.name}: {int(leaked.sum())} image(s) of {len(patients)} patient(s) in "
                          f"{idx.held_out_name}, e.g. {', '.join(patients[:5])}")
    if report:
        raise DataLeakageError("pre-training pool overlaps held-out evaluation patients:\n" + "\n".join(report) +
                               "\nRemove them from the training list, or pass --no-leakage_check if intended.")
