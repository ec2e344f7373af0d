"""Thresholds chosen on validation, applied once to test; and how well the test scores are calibrated.

    python -m tools.operating_points runs/ft_vit_s --target_sensitivity 0.9 --out runs/ft_vit_s/operating_points

Reads a finished multi-label run's val_predictions.csv (the selected weights on the validation list) and
test_predictions.csv. Per finding, two thresholds are chosen on the validation predictions only: Youden's (the
threshold maximising sensitivity + specificity - 1) and the highest threshold whose validation sensitivity reaches
--target_sensitivity. Each is then applied to the test predictions: sensitivity, specificity, PPV, NPV and F1, with
95% patient-bootstrap intervals (--resamples, --seed). The test predictions never choose anything.

Calibration on test: expected calibration error (ECE, --bins equal-width bins of the score) per finding and
pooled, and a reliability diagram. --temperature fits one temperature on the validation logits (minimising the BCE)
and reports test ECE after scaling too. Writes OUT/operating_points.json (thresholds included, to deploy with the
model) and OUT/reliability.png, and prints the table.
"""
import argparse
import os
import sys

import numpy as np

from tools.reporting import check_outputs, run_tool
from util import predictions
from util.errors import SetupError
from util.log import write_json
from util.metrics import patient_bootstrap
from util.vis import save_figure

RATES = ("sensitivity", "specificity", "ppv", "npv", "f1")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run", help="a finished multi-label fine-tuning run folder")
    parser.add_argument("--out", required=True, help="folder for operating_points.json and reliability.png")
    parser.add_argument("--target_sensitivity", type=float, default=0.9,
                        help="the sensitivity the second threshold must reach on validation (default: 0.9)")
    parser.add_argument("--bins", type=int, default=10, help="score bins of the calibration error (default: 10)")
    parser.add_argument("--temperature", action="store_true",
                        help="also fit a temperature on the validation logits and report calibration after it "
                             "(default: off)")
    parser.add_argument("--resamples", type=int, default=1000, help="patient-bootstrap resamples (default: 1000)")
    parser.add_argument("--seed", type=int, default=0, help="bootstrap seed (default: 0)")
    parser.add_argument("--overwrite", action="store_true", help="replace existing outputs in --out (default: off)")
    args = parser.parse_args(argv)
    if not 0 < args.target_sensitivity <= 1:
        parser.error(f"--target_sensitivity is a share in (0, 1], got {args.target_sensitivity}")
    if args.bins < 1 or args.resamples < 1:
        parser.error("--bins and --resamples must be >= 1")
    return run_tool(lambda: operating_points(args))


def read_predictions(folder: str, name: str) -> tuple[list[str], np.ndarray, np.ndarray, np.ndarray]:
    """(findings, labels [N, K], scores [N, K], patients [N]) of a predictions file of a multi-label run."""
    hint = (" (runs before val_predictions.csv was written: score the checkpoint again with --eval)"
            if name.startswith("val") else "")
    table = predictions.read(folder, name, hint)
    findings = predictions.require_findings(table, os.path.join(folder, name), "operating points")
    labels, scores = predictions.arrays(table, findings)
    return findings, labels > 0.5, scores, table["patient"].to_numpy()


def choose_thresholds(scores: np.ndarray, positive: np.ndarray, target_sensitivity: float) -> dict | None:
    """Youden's threshold and the highest threshold reaching the target sensitivity, from one finding's validation
    scores (scikit-learn's ROC curve); None without both classes."""
    from sklearn.metrics import roc_curve

    if positive.all() or not positive.any():
        return None
    fpr, tpr, thresholds = roc_curve(positive, scores, drop_intermediate=False)  # every threshold, for the target
    finite = np.isfinite(thresholds)  # the first point's threshold is +inf (nothing called positive)
    fpr, tpr, thresholds = fpr[finite], tpr[finite], thresholds[finite]
    youden = int(np.argmax(tpr - fpr))
    reaching = np.flatnonzero(tpr >= target_sensitivity)
    return {"youden": float(thresholds[youden]), "sensitivity_target": float(thresholds[reaching[0]])}


def rates(scores: np.ndarray, positive: np.ndarray, threshold: float) -> list[float]:
    """Sensitivity, specificity, PPV, NPV and F1 of 'score >= threshold' (NaN where undefined)."""
    called = scores >= threshold
    tp, fp = np.sum(called & positive), np.sum(called & ~positive)
    fn, tn = np.sum(~called & positive), np.sum(~called & ~positive)

    def share(a, b):
        return a / (a + b) if a + b else np.nan

    sensitivity, ppv = share(tp, fn), share(tp, fp)
    f1 = 2 * tp / (2 * tp + fp + fn) if tp + fp + fn else np.nan
    return [sensitivity, share(tn, fp), ppv, share(tn, fn), f1]


def calibration_error(scores: np.ndarray, positive: np.ndarray, bins: int) -> tuple[float, list[dict]]:
    """Expected calibration error over equal-width score bins: sum over bins of (share of images) x |mean score -
    observed positive rate|; and the bins, for the reliability diagram."""
    edges = np.linspace(0, 1, bins + 1)
    which = np.clip(np.digitize(scores, edges[1:-1]), 0, bins - 1)
    ece, table = 0.0, []
    for b in range(bins):
        inside = which == b
        if inside.any():
            confidence, observed = float(scores[inside].mean()), float(positive[inside].mean())
            ece += inside.mean() * abs(confidence - observed)
            table.append({"bin": [float(edges[b]), float(edges[b + 1])], "images": int(inside.sum()),
                          "mean_score": confidence, "positive_rate": observed})
    return float(ece), table


def fit_temperature(scores: np.ndarray, positive: np.ndarray) -> float:
    """One temperature T for all findings: sigmoid(logit / T) minimising the validation BCE (scipy)."""
    from scipy.optimize import minimize_scalar

    logits = _logit(scores)

    def bce(t):
        p = np.clip(1 / (1 + np.exp(-logits / t)), 1e-7, 1 - 1e-7)
        return -np.mean(positive * np.log(p) + ~positive * np.log(1 - p))

    return float(minimize_scalar(bce, bounds=(0.05, 20.0), method="bounded").x)


def _logit(p: np.ndarray) -> np.ndarray:
    p = np.clip(p, 1e-7, 1 - 1e-7)
    return np.log(p / (1 - p))


def operating_points(args) -> int:
    outputs = [os.path.join(args.out, "operating_points.json"), os.path.join(args.out, "reliability.png")]
    check_outputs(outputs, [], args.overwrite)
    # test first: every finished run has it, so a single-label run is named as such (it writes no validation file)
    test_findings, test_labels, test_scores, patients = read_predictions(args.run, "test_predictions.csv")
    findings, val_labels, val_scores, _ = read_predictions(args.run, "val_predictions.csv")
    if test_findings != findings:
        raise SetupError(f"{args.run}: the validation and test predictions name other findings")
    per_finding = {}
    for k, name in enumerate(findings):
        chosen = choose_thresholds(val_scores[:, k], val_labels[:, k], args.target_sensitivity)
        if chosen is None:
            per_finding[name] = {"note": "one class only in the validation list: no threshold"}
            continue
        entry = {"thresholds_from_validation": chosen}
        for rule, threshold in chosen.items():
            point = rates(test_scores[:, k], test_labels[:, k], threshold)
            intervals = patient_bootstrap(
                lambda rows, k=k, t=threshold: rates(test_scores[rows, k], test_labels[rows, k], t), patients,
                args.resamples, args.seed, what=f"{name} rates")
            entry[rule] = {rate: {"value": None if np.isnan(v) else float(v), "ci95": ci}
                           for rate, v, ci in zip(RATES, point, intervals)}
        ece, _ = calibration_error(test_scores[:, k], test_labels[:, k], args.bins)
        entry["test_ece"] = ece
        per_finding[name] = entry
    pooled_ece, bins = calibration_error(test_scores.ravel(), test_labels.ravel(), args.bins)
    calibration = {"test_ece_pooled": pooled_ece, "bins": bins, "bin_count": args.bins}
    if args.temperature:
        t = fit_temperature(val_scores.ravel(), val_labels.ravel())
        scaled = 1 / (1 + np.exp(-_logit(test_scores) / t))
        calibration.update(temperature_from_validation=t,
                           test_ece_pooled_after_temperature=calibration_error(scaled.ravel(), test_labels.ravel(),
                                                                               args.bins)[0])
    result = {"run": os.path.abspath(args.run), "target_sensitivity": args.target_sensitivity,
              "chosen_on": "val_predictions.csv", "applied_to": "test_predictions.csv", "per_finding": per_finding,
              "calibration": calibration, "resamples": args.resamples, "seed": args.seed}
    os.makedirs(args.out, exist_ok=True)
    reliability_diagram(bins, pooled_ece, outputs[1])
    write_json(outputs[0], result)
    print(format_table(result))
    print(f"wrote {outputs[0]} and {outputs[1]}")
    return 0


def format_table(result: dict) -> str:
    lines = [f"thresholds chosen on validation, applied to test (target sensitivity {result['target_sensitivity']:g})",
             f"  {'finding':<20} {'rule':<18} {'threshold':>9}  {'sens':>6} {'spec':>6} {'ppv':>6} {'npv':>6} "
             f"{'f1':>6}  test ECE"]
    for name, entry in result["per_finding"].items():
        if "note" in entry:
            lines.append(f"  {name:<20} {entry['note']}")
            continue
        for rule in ("youden", "sensitivity_target"):
            values = " ".join("   n/a" if entry[rule][r]["value"] is None else f"{entry[rule][r]['value']:6.3f}"
                              for r in RATES)
            lines.append(f"  {name:<20} {rule:<18} {entry['thresholds_from_validation'][rule]:9.4f}  {values}  "
                         f"{entry['test_ece']:.4f}")
    c = result["calibration"]
    lines.append(f"pooled test ECE {c['test_ece_pooled']:.4f}" + (
        f"; after a temperature of {c['temperature_from_validation']:.3f} fitted on validation: "
        f"{c['test_ece_pooled_after_temperature']:.4f}" if "temperature_from_validation" in c else ""))
    return "\n".join(lines)


def reliability_diagram(bins: list[dict], ece: float, path: str) -> None:
    from util.vis import _pyplot

    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(4.5, 4.5))
    ax.plot([0, 1], [0, 1], linestyle="--", color="gray", linewidth=0.8)
    ax.plot([b["mean_score"] for b in bins], [b["positive_rate"] for b in bins], "o-", color="tab:blue")
    ax.set_xlabel("mean score in the bin")
    ax.set_ylabel("share of positives in the bin")
    ax.set_title(f"test reliability, all findings pooled (ECE {ece:.3f})", fontsize=9)
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1)
    fig.tight_layout()
    save_figure(fig, path)
    plt.close(fig)


if __name__ == "__main__":
    sys.exit(main())
