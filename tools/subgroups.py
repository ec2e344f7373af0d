"""Test results by subgroup: sex, age band, view, the source of a mixed test set, or any column of your metadata.

    python -m tools.subgroups runs/ft_vit_s --metadata data/nih_chestxray/Data_Entry_2017_v2020.csv --out DIR
    python -m tools.subgroups runs/ft_chexpert --metadata data/CheXpert-v1.0-small/valid.csv --age_bands 0,40,60,80
    python -m tools.subgroups runs/covidx_vit_s --metadata data/covidx/test_COVIDx9A.txt --out DIR

Joins a finished run's test_predictions.csv with a metadata file by image: NIH's Data_Entry_2017*.csv
(`Image Index`; sex, age and view from `Patient Gender`, `Patient Age`, `View Position`), a CheXpert CSV (`Path`,
matched by its end; `Sex`, `Age`, `AP/PA`), a COVIDx label file (`patient_id filename label source` lines: the source,
rsna, ricord, ..., of a test set that mixes them), or any CSV with --key_column and --group_columns. Every test image
must be found in the metadata (a clear error otherwise).

Per subgroup, computed on its rows alone: its images and patients, and for a multi-label run per finding and for the
mean the AUROC with a 95% patient-bootstrap interval (a finding with fewer than --min_positives positives or
negatives in the subgroup is reported as too few, not as a number); for a single-label run (COVIDx) the accuracy of
the predicted class with its interval, and each class's count.

Writes OUT/subgroups.json and OUT/subgroups.png (each subgroup's mean AUROC or accuracy with its interval), adds the
same under "subgroups" to the run's results.json (atomically; every other key kept; a second analysis of the run is
refused without --overwrite), and prints a table.
"""
import argparse
import functools
import json
import os
import sys

import numpy as np
import pandas as pd

from tools.reporting import check_outputs, run_tool
from util import predictions
from util.errors import SetupError
from util.log import write_json
from util.metrics import bootstrap_auroc, mean_auroc, patient_bootstrap, per_finding_auroc
from util.vis import save_figure

# metadata formats: key column, then (subgroup name, column) pairs
FORMATS = {
    "nih": ("Image Index", [("sex", "Patient Gender"), ("age", "Patient Age"), ("view", "View Position")]),
    "chexpert": ("Path", [("sex", "Sex"), ("age", "Age"), ("view", "AP/PA")]),
    "covidx": ("filename", [("source", "source")]),
}
COVIDX_COLUMNS = ["patient_id", "filename", "label", "source"]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run", help="a finished fine-tuning run folder")
    parser.add_argument("--metadata", required=True,
                        help="NIH Data_Entry_2017*.csv, a CheXpert CSV, a COVIDx label file, or your CSV")
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
    if args.metadata.endswith(".txt"):  # a COVIDx label file: space-separated, no header
        with open(args.metadata, encoding="utf-8-sig") as f:
            rows = [line.split() for line in f if line.strip()]
        bad = next((k for k, r in enumerate(rows) if len(r) < len(COVIDX_COLUMNS)), None)
        if bad is not None:
            raise SetupError(f"--metadata {args.metadata}, line {bad + 1}: expected 'patient_id filename label "
                             "source' (a COVIDx label file); a CSV needs the .csv extension")
        table = pd.DataFrame([r[:len(COVIDX_COLUMNS)] for r in rows], columns=COVIDX_COLUMNS)
    else:
        table = pd.read_csv(args.metadata, dtype=str, keep_default_na=False, encoding="utf-8-sig")
    if args.key_column:
        groups = [(c.strip(), c.strip()) for c in args.group_columns.split(",") if c.strip()]
        key = args.key_column
    else:
        fmt = next((f for f, (key, _) in FORMATS.items() if key in table.columns), None)
        if fmt is None:
            raise SetupError(f"--metadata {args.metadata}: neither NIH's 'Image Index' nor CheXpert's 'Path' column, "
                             "nor a COVIDx label file (.txt); for another CSV give --key_column and --group_columns")
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
    results_path = os.path.join(args.run, "results.json")
    results = read_results(results_path, args.overwrite)
    table = predictions.read(args.run, "test_predictions.csv")
    findings = predictions.findings_of(table)
    if findings:
        labels, scores = predictions.arrays(table, findings)
        score = functools.partial(score_subgroup, labels=labels, scores=scores, findings=findings, args=args)
    else:
        if not {"label", "predicted"} <= set(table.columns):
            raise SetupError(f"{os.path.join(args.run, 'test_predictions.csv')} has neither '<finding> label' columns "
                             "(multi-label) nor 'label' and 'predicted' (single-label)")
        score = functools.partial(score_single_label, truth=table["label"].astype(str).to_numpy(),
                                  predicted=table["predicted"].astype(str).to_numpy(), args=args)
    patients = table["patient"].to_numpy()
    metadata, key, groups = read_metadata(args)
    joined = join(table, metadata, key, args.metadata)
    result = {"run": os.path.abspath(args.run), "metadata": os.path.abspath(args.metadata),
              "kind": "multi-label" if findings else "single-label",
              "metric": "mean AUROC" if findings else "accuracy", "min_positives": args.min_positives,
              "resamples": args.resamples, "seed": args.seed, "groups": {}}
    for name, column in groups:
        values = joined[column].astype(str).str.strip()
        if name == "age" or column.lower() == "age":
            values = values.map(lambda v: band(v, args.bands))
        result["groups"][name] = {}
        for value in sorted(values.unique()):
            rows = np.flatnonzero(values.to_numpy() == value)
            result["groups"][name][value] = score(rows, patients=patients)
    os.makedirs(args.out, exist_ok=True)
    plot(result, outputs[1])
    write_json(outputs[0], result)
    write_json(results_path, {**results, "subgroups": {**result, "file": os.path.abspath(outputs[0])}})
    print(format_table(result))
    print(f"wrote {outputs[0]} and {outputs[1]}, and the subgroups into {results_path}")
    return 0


def read_results(path: str, overwrite: bool) -> dict:
    """The run's results.json, which gets the subgroups: it must exist (a finished run), and an earlier analysis
    in it is replaced only with --overwrite."""
    if not os.path.isfile(path):
        raise SetupError(f"{os.path.dirname(path)} has no results.json: give a finished fine-tuning run folder")
    with open(path, encoding="utf-8") as f:
        results = json.load(f)
    if "subgroups" in results and not overwrite:
        raise SetupError(f"{path} already holds a subgroup analysis (from {results['subgroups'].get('metadata')}); "
                         "pass --overwrite to replace it")
    return results


def score_single_label(rows, patients, truth, predicted, args) -> dict:
    """The subgroup's accuracy (the predicted class, as results.json's) with its patient-bootstrap interval, from
    its rows alone, and its count of each true class."""
    correct = (truth[rows] == predicted[rows]).astype(np.float64)
    ci = (patient_bootstrap(lambda r: [correct[r].mean()], patients[rows], args.resamples, args.seed,
                            what="accuracy")[0] if args.resamples else None)
    classes, counts = np.unique(truth[rows], return_counts=True)
    return {"images": int(len(rows)), "patients": int(len(np.unique(patients[rows]))),
            "accuracy": float(correct.mean()), "accuracy_ci95": ci,
            "classes": dict(zip(classes.tolist(), counts.tolist()))}


def score_subgroup(rows, patients, labels, scores, findings, args) -> dict:
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


def headline(group: dict) -> tuple[float | None, list | None]:
    """A subgroup's main number and its interval: mean AUROC (multi-label) or accuracy (single-label)."""
    if "accuracy" in group:
        return group["accuracy"], group["accuracy_ci95"]
    return group["mean_auroc"], group["mean_auroc_ci95"]


def format_table(result: dict) -> str:
    multi = result["kind"] == "multi-label"
    metric = "mean AUROC" if multi else "  accuracy"
    lines = [f"  {'subgroup':<24} {'images':>6} {'patients':>8}  {metric}  95% CI            "
             + ("findings scored" if multi else "")]
    for name, values in result["groups"].items():
        for value, g in values.items():
            number, lo_hi = headline(g)
            shown = "    n/a" if number is None else f"{number:.4f}"
            ci = "" if lo_hi is None else f"[{lo_hi[0]:.4f}, {lo_hi[1]:.4f}]"
            lines.append(f"  {name + '=' + value:<24} {g['images']:>6} {g['patients']:>8}  {shown:>10}  {ci:<18} "
                         + (str(g["scored_findings"]) if multi else ""))
    return "\n".join(lines)


def plot(result: dict, path: str) -> None:
    from util.vis import _pyplot

    plt = _pyplot()
    rows = [(f"{n}={v}", headline(g)) for n, values in result["groups"].items() for v, g in values.items()
            if headline(g)[0] is not None]
    fig, ax = plt.subplots(figsize=(6, 0.35 * max(len(rows), 1) + 1.2))
    for y, (label, (number, ci)) in enumerate(reversed(rows)):
        if ci:
            ax.plot(ci, [y, y], color="black", linewidth=1.2)
        ax.plot(number, y, "s", color="tab:blue")
    ax.set_yticks(range(len(rows)), [label for label, _ in reversed(rows)])
    ax.set_xlabel(f"test {result['metric']} of the subgroup, with its 95% patient-bootstrap interval")
    fig.tight_layout()
    save_figure(fig, path)
    plt.close(fig)


if __name__ == "__main__":
    sys.exit(main())
