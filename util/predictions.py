"""The prediction files a fine-tuning run writes (engine_finetune: test_predictions.csv, val_predictions.csv,
test_predictions_excluded.csv), read back by the run itself and by the reporting tools.

Multi-label: `image`, `patient`, then `<finding> label` and `<finding> score` for each finding, in the order of the
logits. Single-label: `image`, `patient`, `label`, `predicted`, then `<class> probability` for each class.
"""
import os

import numpy as np
import pandas as pd

from util.errors import SetupError


def read(folder: str, name: str, hint: str = "") -> pd.DataFrame:
    """folder/name as a table (image and patient as text), or a one-line error naming the folder."""
    path = os.path.join(folder, name)
    if not os.path.isfile(path):
        raise SetupError(f"{folder} has no {name}: give a finished fine-tuning run folder{hint}")
    return pd.read_csv(path, dtype={"image": str, "patient": str})


def findings_of(table: pd.DataFrame) -> list[str]:
    """The findings of a multi-label table, in column order (none for a single-label one)."""
    return [c[: -len(" label")] for c in table.columns if c.endswith(" label")]


def require_findings(table: pd.DataFrame, path: str, what: str) -> list[str]:
    findings = findings_of(table)
    if not findings:
        raise SetupError(f"{path} has no '<finding> label' columns: {what} are for multi-label runs. A single-label "
                         "run decides by the largest probability; its results.json has each class's sensitivity and "
                         "PPV with their intervals")
    return findings


def arrays(table: pd.DataFrame, findings: list[str], dtype=np.float64) -> tuple[np.ndarray, np.ndarray]:
    """(labels [N, K], scores [N, K]) of the findings' columns."""
    return (table[[f"{f} label" for f in findings]].to_numpy(dtype),
            table[[f"{f} score" for f in findings]].to_numpy(dtype))
