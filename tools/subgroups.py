"""Test AUROC by subgroup: sex, age band, view, or any column of your metadata.

    python -m tools.subgroups runs/ft_vit_s --metadata data/nih_chestxray/Data_Entry_2017_v2020.csv --out DIR
    python -m tools.subgroups runs/ft_chexpert --metadata data/CheXpert-v1.0-small/valid.csv --age_bands 0,40,60,80

Joins a finished multi-label run's test_predictions.csv with a metadata file by image: NIH's Data_Entry_2017*.csv
(`Image Index`; sex, age and view from `Patient Gender`, `Patient Age`, `View Position`), a CheXpert CSV (`Path`,
matched by its end; `Sex`, `Age`, `AP/PA`), or any CSV with --key_column and --group_columns. Every test image must
be found in the metadata (a clear error otherwise). Per subgroup: its images and patients, and per finding and for
the mean the AUROC with a 95% patient-bootstrap interval, computed on the subgroup's rows alone. A finding with
fewer than --min_positives positives (or negatives) in a subgroup is reported as too few, not as a number.

Writes OUT/subgroups.json and OUT/subgroups.png (each subgroup's mean AUROC with its interval) and prints a table.
"""
import argparse
import os
import sys

import numpy as np
import pandas as pd

from tools.reporting import check_outputs, run_tool
from util import predictions
from util.errors import SetupError
from util.log import write_json
from util.metrics import bootstrap_auroc, mean_auroc, per_finding_auroc
from util.vis import save_figure

# metadata formats: key column, then (subgroup name, column) pairs
FORMATS = {
    "nih": ("Image Index", [("sex", "Patient Gender"), ("age", "Patient Age"), ("view", "View Position")]),
    "chexpert": ("Path", [("sex", "Sex"), ("age", "Age"), ("view", "AP/PA")]),
}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run", help="a finished multi-label fine-tuning run folder")
    parser.add_argument("--metadata", required=True, help="NIH Data_Entry_2017*.csv, a CheXpert CSV, or your CSV")
    parser.add_argument("--out", required=True, help="folder for subgroups.json and subgroups.png")
    parser.add_argument("--age_bands", default="0,40,60,80",
                        help="lower edges of the age bands, in years (default: 0,40,60,80: <40, 40-59, 60-79, 80+)")
    parser.add_argument("--key_column", default=None,
                        help="your CSV: the column of the image names as test_predictions.csv writes them")
    parser.add_argument("--group_columns", default=None, metavar="A,B",
                        help="your CSV: the columns to group by (an 'age' column is banded)")
    parser.add_argument("--min_positives", type=int, default=5,
                        help="fewest positives and negatives of a finding in a subgroup for an AUROC (default: 5)")
    parser.add_argument("--resamples", type=int, default=1000, help="patient-bootstrap resamples (default: 1000)")
    parser.add_argument("--seed", type=int, default=0, help="bootstrap seed (default: 0)")
    parser.add_argument("--overwrite", action="store_true", help="replace existing outputs in --out (default: off)")
    args = parser.parse_args(argv)
    try:
        args.bands = sorted(float(v) for v in args.age_bands.split(","))
    except ValueError:
        parser.error(f"--age_bands takes comma-separated numbers, got {args.age_bands!r}")
    if bool(args.key_column) != bool(args.group_columns):
        parser.error("--key_column and --group_columns go together (your own CSV)")
    return run_tool(lambda: subgroups(args))


def read_metadata(args) -> tuple[pd.DataFrame, str, list[tuple[str, str]]]:
    if not os.path.isfile(args.metadata):
        raise SetupError(f"--metadata {args.metadata} not found")
    table = pd.read_csv(args.metadata, dtype=str, keep_default_na=False, encoding="utf-8-sig")
    if args.key_column:
        groups = [(c.strip(), c.strip()) for c in args.group_columns.split(",") if c.strip()]
        key = args.key_column
    else:
        fmt = next((f for f, (key, _) in FORMATS.items() if key in table.columns), None)
        if fmt is None:
            raise SetupError(f"--metadata {args.metadata}: neither NIH's 'Image Index' nor CheXpert's 'Path' column; "
                             "for another CSV give --key_column and --group_columns")
        key, groups = FORMATS[fmt]
    missing = [c for c in [key, *(c for _, c in groups)] if c not in table.columns]
    if missing:
        raise SetupError(f"--metadata {args.metadata} lacks the column(s) {missing}; found {list(table.columns)[:12]}")
    return table, key, groups


def join(table: pd.DataFrame, metadata: pd.DataFrame, key: str, path: str) -> pd.DataFrame:
    """The metadata row of every test image: an exact key, or (CheXpert paths) the key that ends with the name."""
    by_key = metadata.drop_duplicates(key).set_index(key)
    exact = table["image"].isin(by_key.index)
    if exact.all():
        return by_key.loc[table["image"]].reset_index(drop=True)
    suffix = {k.replace("\\", "/").split("/", 1)[-1]: k for k in by_key.index}  # CheXpert: drop the top folder
    rows = []
    for name in table["image"]:
        match = name if name in by_key.index else next((full for end, full in suffix.items()
                                                        if end.endswith(name) or name.endswith(end)), None)
        if match is None:
            raise SetupError(f"--metadata {path} has no row for the test image {name!r}; give the metadata of the "
                             "run's test list")
        rows.append(by_key.loc[match])
    return pd.DataFrame(rows).reset_index(drop=True)


def band(value: str, bands: list[float]) -> str:
    try:
        age = float(str(value).rstrip("Y"))  # some NIH exports write '058Y'
    except ValueError:
        return "unknown"
    lower = max((b for b in bands if b <= age), default=None)
    if lower is None:
        return f"<{bands[0]:g}"
    upper = next((b for b in bands if b > lower), None)
    return f"{lower:g}+" if upper is None else f"{lower:g}-{upper - 1:g}"


def subgroups(args) -> int:
    outputs = [os.path.join(args.out, "subgroups.json"), os.path.join(args.out, "subgroups.png")]
    check_outputs(outputs, [], args.overwrite)
    table = predictions.read(args.run, "test_predictions.csv")
    findings = predictions.require_findings(table, os.path.join(args.run, "test_predictions.csv"), "subgroups")
    labels, scores = predictions.arrays(table, findings)
    patients = table["patient"].to_numpy()
    metadata, key, groups = read_metadata(args)
    joined = join(table, metadata, key, args.metadata)
    result = {"run": os.path.abspath(args.run), "metadata": os.path.abspath(args.metadata),
              "min_positives": args.min_positives, "resamples": args.resamples, "seed": args.seed, "groups": {}}
    for name, column in groups:
        values = joined[column].astype(str).str.strip()
        if name == "age" or column.lower() == "age":
            values = values.map(lambda v: band(v, args.bands))
        result["groups"][name] = {}
        for value in sorted(values.unique()):
            rows = np.flatnonzero(values.to_numpy() == value)
            result["groups"][name][value] = score_subgroup(rows, labels, scores, patients, findings, args)
    os.makedirs(args.out, exist_ok=True)
    plot(result, outputs[1])
    write_json(outputs[0], result)
    print(format_table(result))
    print(f"wrote {outputs[0]} and {outputs[1]}")
    return 0


def score_subgroup(rows, labels, scores, patients, findings, args) -> dict:
    """The subgroup's AUROCs, from its rows alone; a finding with too few of either class is marked, not scored."""
    positives = labels[rows].sum(axis=0)
    enough = (positives >= args.min_positives) & (len(rows) - positives >= args.min_positives)
    aurocs = per_finding_auroc(scores[rows][:, enough], labels[rows][:, enough]) if enough.any() else []
    ci = (bootstrap_auroc(scores[rows][:, enough], labels[rows][:, enough], patients[rows], args.resamples,
                          seed=args.seed) if enough.any() else None)
    per_finding, k = {}, 0
    for name, ok, count in zip(findings, enough, positives):
        if ok:
            per_finding[name] = {"auroc": aurocs[k], "ci95": ci["per_finding"][k], "positives": int(count)}
            k += 1
        else:
            per_finding[name] = {"auroc": None, "positives": int(count),
                                 "note": f"too few: fewer than {args.min_positives} positives or negatives"}
    return {"images": int(len(rows)), "patients": int(len(np.unique(patients[rows]))),
            "mean_auroc": mean_auroc(aurocs) if enough.any() else None,
            "mean_auroc_ci95": ci["mean"] if ci else None, "scored_findings": int(enough.sum()),
            "per_finding": per_finding}


def format_table(result: dict) -> str:
    lines = [f"  {'subgroup':<24} {'images':>6} {'patients':>8}  mean AUROC  95% CI            findings scored"]
    for name, values in result["groups"].items():
        for value, g in values.items():
            mean = "    n/a" if g["mean_auroc"] is None else f"{g['mean_auroc']:.4f}"
            lo_hi = g["mean_auroc_ci95"]
            ci = "" if lo_hi is None else f"[{lo_hi[0]:.4f}, {lo_hi[1]:.4f}]"
            lines.append(f"  {name + '=' + value:<24} {g['images']:>6} {g['patients']:>8}  {mean:>10}  {ci:<18} "
                         f"{g['scored_findings']}")
    return "\n".join(lines)


def plot(result: dict, path: str) -> None:
    from util.vis import _pyplot

    plt = _pyplot()
    rows = [(f"{n}={v}", g) for n, values in result["groups"].items() for v, g in values.items()
            if g["mean_auroc"] is not None]
    fig, ax = plt.subplots(figsize=(6, 0.35 * max(len(rows), 1) + 1.2))
    for y, (label, g) in enumerate(reversed(rows)):
        if g["mean_auroc_ci95"]:
            ax.plot(g["mean_auroc_ci95"], [y, y], color="black", linewidth=1.2)
        ax.plot(g["mean_auroc"], y, "s", color="tab:blue")
    ax.set_yticks(range(len(rows)), [label for label, _ in reversed(rows)])
    ax.set_xlabel("test mean AUROC of the subgroup, with its 95% patient-bootstrap interval")
    fig.tight_layout()
    save_figure(fig, path)
    plt.close(fig)


if __name__ == "__main__":
    sys.exit(main())
