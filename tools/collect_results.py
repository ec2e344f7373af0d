"""One table from many fine-tuning runs: mean +- std over seeds, per checkpoint and label fraction.

    python -m tools.collect_results runs/sweep --out tables/sweep

Takes run folders, or folders holding them at any depth (as tools/sweep.py lays them out). Each run is identified
by its own args.json (--finetune, --label_fraction, --seed) and scored from its results.json; nothing is inferred
from folder names. Per (checkpoint, label fraction): the number of seeds, mean +- std over seeds of the mean test
AUROC (or accuracy, for single-label runs), and a pooled interval: whole patients of the shared test list resampled
(--resamples, --seed), each run's score computed on the resample from its test_predictions.csv, the runs averaged;
the 2.5 and 97.5 percentiles of that average. A folder with args.json but no results.json (unfinished or failed) is
listed as such, never dropped.

Writes OUT/results.md, OUT/results.csv, OUT/results.tex (a booktabs table for a paper) and OUT/score_vs_fraction.png
(one line per checkpoint, mean +- std over seeds against the label fraction).
"""
import argparse
import json
import os
import sys

import numpy as np
import pandas as pd

from tools.reporting import check_outputs, run_tool
from tools.sweep import run_name
from util import predictions
from util.errors import SetupError
from util.log import write_text
from util.metrics import mean_auroc, patient_bootstrap, per_finding_auroc
from util.vis import save_figure


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("runs", nargs="+", help="run folders, or folders holding them")
    parser.add_argument("--out", required=True, help="folder for results.md, .csv, .tex and score_vs_fraction.png")
    parser.add_argument("--resamples", type=int, default=1000, help="patient resamples of the pooled interval "
                        "(0: none; default: 1000)")
    parser.add_argument("--seed", type=int, default=0, help="bootstrap seed (default: 0)")
    parser.add_argument("--overwrite", action="store_true", help="replace existing tables in --out (default: off)")
    args = parser.parse_args(argv)
    if args.resamples < 0:
        parser.error(f"--resamples must be >= 0, got {args.resamples}")
    return run_tool(lambda: collect(args))


def find_runs(paths: list[str]) -> list[str]:
    """Every folder with an args.json at or below the given paths, in sorted order."""
    found = []
    for path in paths:
        if not os.path.isdir(path):
            raise SetupError(f"{path} is not a folder")
        for folder, _, files in os.walk(path):
            if "args.json" in files:
                found.append(folder)
    if not found:
        raise SetupError(f"no run folder (one with args.json) under {', '.join(paths)}")
    return sorted(set(found))


def read_run(folder: str) -> dict:
    with open(os.path.join(folder, "args.json"), encoding="utf-8") as f:
        run_args = json.load(f)
    run = {"folder": folder, "checkpoint": run_args.get("finetune") or "random init",
           "fraction": float(run_args.get("label_fraction", 1.0)), "seed": run_args.get("seed"),
           "finished": os.path.isfile(os.path.join(folder, "results.json"))}
    if run["finished"]:
        with open(os.path.join(folder, "results.json"), encoding="utf-8") as f:
            results = json.load(f)
        run["kind"] = results.get("kind", "multi-label")
        run["score"] = (results["test"]["accuracy"] if run["kind"] == "single-label"
                        else results["test"]["mean_auroc"])
        run["test_list"] = results["test"].get("list")
    return run


def score_table(folder: str, kind: str) -> tuple[pd.DataFrame, callable]:
    """The run's test predictions by image, and a function rows -> its score on those rows."""
    table = predictions.read(folder, "test_predictions.csv").set_index("image").sort_index()
    if kind == "single-label":
        correct = (table["predicted"] == table["label"]).to_numpy()
        return table, lambda rows: float(correct[rows].mean())
    labels, scores = predictions.arrays(table, predictions.findings_of(table))

    def score(rows):
        value = mean_auroc(per_finding_auroc(scores[rows], labels[rows]))
        return np.nan if value is None else value
    return table, score


def pooled_interval(runs: list[dict], resamples: int, seed: int) -> list[float] | None:
    """Percentile interval of the seeds' average score over resamples of the shared test list's patients."""
    if resamples == 0:
        return None
    tables = [score_table(r["folder"], r["kind"]) for r in runs]
    index = tables[0][0].index
    for run, (table, _) in zip(runs, tables):
        if not table.index.equals(index):
            raise SetupError(f"{run['folder']} scored other test images than {runs[0]['folder']}: the runs of one "
                             "row must share a test list")
    patients = tables[0][0]["patient"].to_numpy()
    interval = patient_bootstrap(lambda rows: [np.mean([score(rows) for _, score in tables])], patients, resamples,
                                 seed, what="pooled score")[0]
    return None if interval is None else [interval[0], interval[1]]


def collect(args) -> int:
    outputs = [os.path.join(args.out, n) for n in ("results.md", "results.csv", "results.tex",
                                                   "score_vs_fraction.png")]
    check_outputs(outputs, [], args.overwrite)
    runs = [read_run(folder) for folder in find_runs(args.runs)]
    done = [r for r in runs if r["finished"]]
    if not done:
        raise SetupError(f"none of the {len(runs)} run(s) found has finished (no results.json)")
    kinds = {r["kind"] for r in done}
    if len(kinds) > 1:
        raise SetupError(f"the runs mix {sorted(kinds)} tasks; collect one task at a time")
    metric = "accuracy" if kinds == {"single-label"} else "mean AUROC"
    rows = []
    for (checkpoint, fraction), group in pd.DataFrame(done).groupby(["checkpoint", "fraction"], sort=True):
        group_runs = group.to_dict("records")
        scores = np.array([r["score"] for r in group_runs], dtype=float)
        rows.append({"checkpoint": checkpoint, "label_fraction": fraction, "seeds": len(scores),
                     "seed_list": sorted(int(r["seed"]) for r in group_runs if r["seed"] is not None),
                     "mean": float(scores.mean()), "std": float(scores.std(ddof=1)) if len(scores) > 1 else None,
                     "pooled_ci95": pooled_interval(group_runs, args.resamples, args.seed)})
    unfinished = [r["folder"] for r in runs if not r["finished"]]
    os.makedirs(args.out, exist_ok=True)
    table = pd.DataFrame(rows)
    write_text(outputs[1], table.assign(pooled_ci95=table["pooled_ci95"].astype(str)).to_csv(index=False))
    markdown = format_markdown(rows, metric, unfinished, args)
    write_text(outputs[0], markdown)
    write_text(outputs[2], format_latex(rows, metric))
    plot(rows, metric, outputs[3])
    print(markdown, end="")
    print(f"wrote {', '.join(outputs)}")
    return 0


def _ci(ci) -> str:
    return "" if ci is None else f"[{ci[0]:.4f}, {ci[1]:.4f}]"


def format_markdown(rows: list[dict], metric: str, unfinished: list[str], args) -> str:
    lines = [f"| checkpoint | label fraction | seeds | {metric} (mean ± std over seeds) | pooled 95% CI |",
             "|---|---|---|---|---|"]
    for r in rows:
        spread = f" ± {r['std']:.4f}" if r["std"] is not None else " (one seed)"
        lines.append(f"| {r['checkpoint']} | {r['label_fraction']:g} | {r['seeds']} | {r['mean']:.4f}{spread} | "
                     f"{_ci(r['pooled_ci95'])} |")
    lines.append("")
    lines.append(f"Pooled interval: {args.resamples} patient resamples of the test list (seed {args.seed}), each "
                 "seed's run scored on the resample, the seeds averaged." if args.resamples else
                 "No pooled interval (--resamples 0).")
    if unfinished:
        lines.append(f"Not finished (no results.json), left out of the table: {', '.join(unfinished)}")
    return "\n".join(lines) + "\n"


def _latex(text: str) -> str:
    return "".join("\\" + c if c in "&%$#_{}" else c for c in str(text))


def short_name(checkpoint: str) -> str:
    """A checkpoint as a paper's table names it: its folder and file stem, as tools/sweep.py names run folders."""
    return checkpoint if checkpoint == "random init" else run_name(checkpoint)


def format_latex(rows: list[dict], metric: str) -> str:
    lines = ["\\begin{tabular}{llrl}", "\\toprule",
             f"Checkpoint & Labels & Seeds & {_latex(metric)} \\\\", "\\midrule"]
    for r in rows:
        spread = f" $\\pm$ {r['std']:.3f}" if r["std"] is not None else ""
        lines.append(f"{_latex(short_name(r['checkpoint']))} & {r['label_fraction'] * 100:g}\\% & {r['seeds']} & "
                     f"{r['mean']:.3f}{spread} \\\\")
    lines += ["\\bottomrule", "\\end{tabular}"]
    return "\n".join(lines) + "\n"


def plot(rows: list[dict], metric: str, path: str) -> None:
    from util.vis import _pyplot

    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6, 4))
    for checkpoint in sorted({r["checkpoint"] for r in rows}):
        points = sorted((r["label_fraction"], r["mean"], r["std"] or 0.0) for r in rows
                        if r["checkpoint"] == checkpoint)
        x, y, err = (np.array(v) for v in zip(*points))
        ax.errorbar(x * 100, y, yerr=err, marker="o", capsize=3, label=short_name(checkpoint))
    ax.set_xscale("log")
    ax.set_xlabel("label fraction (% of the training list, drawn by patient)")
    ax.set_ylabel(f"test {metric} (mean ± std over seeds)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    save_figure(fig, path)
    plt.close(fig)


if __name__ == "__main__":
    sys.exit(main())
