"""Compare two fine-tuning runs scored on the same test images: is A better than B, by how much, and how sure.

    python -m tools.compare_runs runs/ft_mae runs/ft_imagenet --out comparisons/mae_vs_imagenet

Reads each run folder's test_predictions.csv (and results.json for the task) and nothing else: no model, no GPU.
The two runs must have scored the same images (by name) with the same labels; anything else is refused, naming the
images that differ.

Multi-label runs (NIH, CheXpert, NODE21, your CSV with 0/1 label columns), per finding and for the mean over findings:
the AUROC of each run, the difference A - B with its 95% interval from a paired patient bootstrap (both runs' scores
resampled together, by patient), and DeLong's test of equal AUROC (per finding; Holm-corrected across findings). The
mean's p-value comes from the paired bootstrap (the share of resamples on the other side of 0, doubled).
Single-label runs (COVIDx, your CSV with a class column): accuracy of each, the difference with its paired-bootstrap
interval, and McNemar's exact test.

Writes OUT/comparison.json, OUT/comparison.md (the table) and OUT/forest.png (differences with their intervals);
prints the table. --seed and --resamples are recorded, so the numbers can be made again from the two folders.
"""
import argparse
import json
import os
import sys

import numpy as np
import pandas as pd

from tools.reporting import check_outputs, run_tool
from util import predictions
from util.errors import SetupError
from util.log import write_json, write_text
from util.metrics import auroc, patient_bootstrap
from util.stats import delong_paired, holm, mcnemar
from util.vis import save_figure


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run_a", help="a fine-tuning run folder (holds test_predictions.csv and results.json)")
    parser.add_argument("run_b", help="the run to compare it with, scored on the same test images")
    parser.add_argument("--out", required=True, help="folder to write comparison.json, comparison.md, forest.png")
    parser.add_argument("--resamples", type=int, default=1000, help="paired patient-bootstrap resamples (default: "
                        "1000)")
    parser.add_argument("--seed", type=int, default=0, help="bootstrap seed (default: 0)")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing comparison in --out "
                        "(default: off, refused)")
    args = parser.parse_args(argv)
    if args.resamples < 1:
        parser.error(f"--resamples must be >= 1, got {args.resamples}")
    return run_tool(lambda: compare(args))


def read_run(folder: str) -> tuple[pd.DataFrame, dict]:
    table = predictions.read(folder, "test_predictions.csv", " (its test list scored)")
    results = os.path.join(folder, "results.json")
    if not os.path.isfile(results):
        raise SetupError(f"{folder} has no results.json: give a finished fine-tuning run folder (its test list "
                         "scored)")
    with open(results, encoding="utf-8") as f:
        return table, json.load(f)


def align(a: pd.DataFrame, b: pd.DataFrame, name_a: str, name_b: str) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Both tables in the same image order; refused unless the image sets are equal."""
    only_a, only_b = sorted(set(a["image"]) - set(b["image"])), sorted(set(b["image"]) - set(a["image"]))
    if only_a or only_b or len(a) != len(b):
        raise SetupError(f"the runs scored different test images: {len(only_a)} only in {name_a} (e.g. "
                         f"{only_a[:3]}), {len(only_b)} only in {name_b} (e.g. {only_b[:3]}); compare runs scored on "
                         "the same --test_list")
    a = a.set_index("image").sort_index()
    return a, b.set_index("image").loc[a.index]


def compare(args) -> int:
    outputs = [os.path.join(args.out, n) for n in ("comparison.json", "comparison.md", "forest.png")]
    check_outputs(outputs, [], args.overwrite)
    (pa, ra), (pb, rb) = read_run(args.run_a), read_run(args.run_b)
    kind_a, kind_b = (r.get("kind", "multi-label") for r in (ra, rb))
    if kind_a != kind_b:
        raise SetupError(f"{args.run_a} is {kind_a} and {args.run_b} is {kind_b}: compare runs of the same task")
    a, b = align(pa, pb, args.run_a, args.run_b)
    patients = a["patient"].to_numpy()
    if kind_a == "single-label":
        comparison = compare_single_label(a, b, patients, args)
    else:
        comparison = compare_multi_label(a, b, patients, args)
    comparison.update(run_a=os.path.abspath(args.run_a), run_b=os.path.abspath(args.run_b), images=len(a),
                      patients=int(len(np.unique(patients))), resamples=args.resamples, seed=args.seed)
    os.makedirs(args.out, exist_ok=True)
    table = format_table(comparison, args.run_a, args.run_b)
    print(table)
    write_text(outputs[1], table + "\n")
    forest_plot(comparison, outputs[2], args.run_a, args.run_b)
    write_json(outputs[0], comparison)
    print(f"wrote {outputs[0]}, {outputs[1]} and {outputs[2]}")
    return 0


def _bootstrap_p(differences: np.ndarray, observed: float) -> float:
    """Two-sided p-value of a zero difference from paired-bootstrap differences: twice the smaller share of
    resamples at or beyond zero on either side (the percentile interval's own test)."""
    differences = differences[np.isfinite(differences)]
    if observed == 0 or not len(differences):
        return 1.0
    below, above = np.mean(differences <= 0), np.mean(differences >= 0)
    return float(min(1.0, 2 * min(below, above)))


def compare_multi_label(a: pd.DataFrame, b: pd.DataFrame, patients: np.ndarray, args) -> dict:
    findings = predictions.findings_of(a)
    (labels, sa), (labels_b, sb) = predictions.arrays(a, findings), predictions.arrays(b, findings)
    if not np.array_equal(labels, labels_b):
        raise SetupError("the runs' test labels differ for the same images: they were scored against different "
                         "label files")
    defined = [k for k in range(len(findings)) if 0 < labels[:, k].sum() < len(labels)]

    def differences(rows):
        out = []
        for k in defined:
            x, y = auroc(sa[rows, k], labels[rows, k]), auroc(sb[rows, k], labels[rows, k])
            out.append(np.nan if x is None or y is None else x - y)
        finite = [v for v in out if np.isfinite(v)]
        return [*out, np.mean(finite) if finite else np.nan]

    draws = []  # the resamples' differences, for the mean's p-value

    def recorded(rows):
        values = differences(rows)
        draws.append(values[-1])
        return values

    intervals = patient_bootstrap(recorded, patients, args.resamples, args.seed, what="paired AUROC differences")
    tests = {k: delong_paired(sa[:, k], sb[:, k], labels[:, k]) for k in defined}
    adjusted = holm([tests[k].p_value for k in defined])
    rows = []
    for i, k in enumerate(defined):
        t = tests[k]
        rows.append({"finding": findings[k], "auroc_a": t.auroc_a, "auroc_b": t.auroc_b, "difference": t.difference,
                     "ci95": intervals[i], "delong_p": t.p_value, "delong_p_holm": adjusted[i]})
    mean_difference = float(np.mean([r["difference"] for r in rows]))
    mean = {"finding": "mean", "auroc_a": float(np.mean([r["auroc_a"] for r in rows])),
            "auroc_b": float(np.mean([r["auroc_b"] for r in rows])), "difference": mean_difference,
            "ci95": intervals[-1], "bootstrap_p": _bootstrap_p(np.array(draws), mean_difference)}
    skipped = [findings[k] for k in range(len(findings)) if k not in defined]
    return {"kind": "multi-label", "metric": "AUROC", "per_finding": rows, "mean": mean,
            "undefined_findings": skipped,
            "note": "DeLong p-values per finding, Holm-corrected across findings; the mean's p-value from the paired "
                    "patient bootstrap"}


def compare_single_label(a: pd.DataFrame, b: pd.DataFrame, patients: np.ndarray, args) -> dict:
    if not (a["label"] == b["label"]).all():
        raise SetupError("the runs' test labels differ for the same images: they were scored against different "
                         "label files")
    correct_a = (a["predicted"] == a["label"]).to_numpy()
    correct_b = (b["predicted"] == b["label"]).to_numpy()
    observed = float(correct_a.mean() - correct_b.mean())
    draws = []

    def difference(rows):
        value = correct_a[rows].mean() - correct_b[rows].mean()
        draws.append(value)
        return [value]

    interval = patient_bootstrap(difference, patients, args.resamples, args.seed, what="paired accuracy difference")
    test = mcnemar(correct_a, correct_b)
    return {"kind": "single-label", "metric": "accuracy", "accuracy_a": float(correct_a.mean()),
            "accuracy_b": float(correct_b.mean()), "difference": observed, "ci95": interval[0],
            "mcnemar": test, "bootstrap_p": _bootstrap_p(np.array(draws), observed)}


def _interval(ci) -> str:
    return "n/a" if ci is None else f"[{ci[0] + 0.0:+.4f}, {ci[1] + 0.0:+.4f}]"  # + 0.0: no "-0.0000"


def format_table(c: dict, name_a: str, name_b: str) -> str:
    head = (f"A = {name_a}\nB = {name_b}\n{c['images']} test images, {c['patients']} patients; "
            f"{c['resamples']} paired patient-bootstrap resamples (seed {c['seed']})\n")
    if c["kind"] == "single-label":
        m = c["mcnemar"]
        return head + (f"accuracy A {c['accuracy_a']:.4f}  B {c['accuracy_b']:.4f}  A-B {c['difference']:+.4f} "
                       f"95% CI {_interval(c['ci95'])}  McNemar p {m['p_value']:.4g} (only A right: "
                       f"{m['only_a_correct']}, only B right: {m['only_b_correct']})")
    width = max(len(r["finding"]) for r in [*c["per_finding"], c["mean"]])
    lines = [head + f"| {'finding':{width}} | AUROC A | AUROC B |   A - B | 95% CI (paired bootstrap) | DeLong p | "
                    "Holm p |",
             f"|{'-' * (width + 2)}|---------|---------|---------|---------------------------|----------|--------|"]
    for r in c["per_finding"]:
        lines.append(f"| {r['finding']:{width}} | {r['auroc_a']:.4f}  | {r['auroc_b']:.4f}  | {r['difference']:+.4f} "
                     f"| {_interval(r['ci95']):25} | {r['delong_p']:8.4g} | {r['delong_p_holm']:6.3g} |")
    m = c["mean"]
    lines.append(f"| {'mean':{width}} | {m['auroc_a']:.4f}  | {m['auroc_b']:.4f}  | {m['difference']:+.4f} "
                 f"| {_interval(m['ci95']):25} | {'':8} | {'':6} |")
    lines.append(f"mean: paired-bootstrap p {m['bootstrap_p']:.4g}" + (
        f"; AUROC undefined (one class in the test set) for {', '.join(c['undefined_findings'])}"
        if c["undefined_findings"] else ""))
    return "\n".join(lines)


def forest_plot(c: dict, path: str, name_a: str, name_b: str) -> None:
    """Each finding's (and the mean's) A - B difference with its interval, a line at 0."""
    from util.vis import _pyplot

    plt = _pyplot()
    rows = ([*c["per_finding"], c["mean"]] if c["kind"] == "multi-label"
            else [{"finding": "accuracy", "difference": c["difference"], "ci95": c["ci95"]}])
    fig, ax = plt.subplots(figsize=(6.5, 0.4 * len(rows) + 1.4))
    for y, r in enumerate(reversed(rows)):
        lo, hi = r["ci95"] if r["ci95"] is not None else (r["difference"], r["difference"])
        ax.plot([lo, hi], [y, y], color="black", linewidth=1.2)
        ax.plot(r["difference"], y, "s", color="tab:red" if r["finding"] == "mean" else "tab:blue")
    ax.axvline(0, color="gray", linestyle="--", linewidth=0.8)
    ax.set_yticks(range(len(rows)), [r["finding"] for r in reversed(rows)])
    ax.set_xlabel(f"{c['metric']} difference, A - B, with 95% paired patient-bootstrap intervals")
    ax.set_title(f"A: {os.path.basename(os.path.normpath(name_a))}   B: {os.path.basename(os.path.normpath(name_b))}",
                 fontsize=9)
    fig.tight_layout()
    save_figure(fig, path)
    plt.close(fig)


if __name__ == "__main__":
    sys.exit(main())
