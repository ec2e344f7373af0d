"""Export a finished fine-tuning run's selected classifier for deployment: weights and a sidecar with everything a
deployed model needs, its decision thresholds included.

    python -m tools.export_classifier runs/ft_vit_s --out exports/ft_vit_s --target_sensitivity 0.9

Reads the run's checkpoint-best.pth (the weights selected on validation; the run must be complete: results.json)
and writes OUT.pth and OUT.safetensors (the classifier's state dict: a timm VisionTransformer or a torchvision
DenseNet/ResNet with its head, as main_finetune_chestxray.py builds it) and OUT.json: the model and how to build it,
the findings (or classes) in the order of the logits, the activation (sigmoid per finding, or softmax), the input
size, channels, mean/std and evaluation transform of the run, the selected epoch and its validation score, the test
results, and for a multi-label run each finding's thresholds: Youden's and the highest reaching
--target_sensitivity, chosen on the run's val_predictions.csv only (tools.operating_points's rule; the test
predictions choose nothing). A single-label run decides by the argmax, so it has no thresholds. The written weights
are loaded into a freshly built classifier and its logits compared with the checkpoint's on a probe batch.
"""
import argparse
import json
import os
import sys

import torch

from data.labelled import SOURCE_OF
from data.transforms import norm_stats_for
from tools.export_encoder import write_safetensors
from tools.operating_points import choose_thresholds, read_predictions
from tools.reporting import check_outputs, run_tool
from util.checkpoint import BEST_NAME, atomic_save, load_checkpoint
from util.errors import SetupError
from util.log import git_commit, write_json


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run", help="a finished fine-tuning or linear-probe run folder")
    parser.add_argument("--out", required=True, help="output path without extension: OUT.pth, OUT.safetensors, "
                        "OUT.json")
    parser.add_argument("--target_sensitivity", type=float, default=0.9,
                        help="the validation sensitivity the second threshold must reach (default: 0.9)")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing export (default: off)")
    args = parser.parse_args(argv)
    if not 0 < args.target_sensitivity <= 1:
        parser.error(f"--target_sensitivity is a share in (0, 1], got {args.target_sensitivity}")
    return run_tool(lambda: export(args))


def build_classifier(run_args: dict, linear_probe: bool):
    """The classifier as the run built it (main_finetune_chestxray.build_classifier), from the checkpoint's args."""
    import main_finetune_chestxray as ft_main

    args = argparse.ArgumentParser(parents=[ft_main.get_args_parser(linear_probe)]).parse_args([])
    for key, value in run_args.items():
        setattr(args, key, value)
    return ft_main.build_classifier(args, linear_probe=linear_probe).model, args


def thresholds_from_validation(run: str, target_sensitivity: float) -> dict:
    """Per finding: Youden's threshold and the one reaching the target sensitivity, from val_predictions.csv."""
    findings, labels, scores, _ = read_predictions(run, "val_predictions.csv")
    out = {}
    for k, name in enumerate(findings):
        chosen = choose_thresholds(scores[:, k], labels[:, k], target_sensitivity)
        out[name] = chosen if chosen is not None else {"note": "one class only in the validation list: no threshold"}
    return out


def export(args) -> int:
    outputs = [args.out + ext for ext in (".pth", ".safetensors", ".json")]
    best = os.path.join(args.run, BEST_NAME)
    check_outputs(outputs, [best], args.overwrite)
    results_path = os.path.join(args.run, "results.json")
    if not os.path.isfile(results_path) or not os.path.isfile(best):
        raise SetupError(f"{args.run} is not a finished fine-tuning run (it needs {BEST_NAME} and results.json)")
    with open(results_path, encoding="utf-8") as f:
        results = json.load(f)
    ckpt = load_checkpoint(best)
    if ckpt.get("task") not in ("finetune", "linprobe"):
        raise SetupError(f"{best} is a {ckpt.get('task') or 'pre-training'} checkpoint; this tool exports "
                         "classifiers (tools.export_encoder exports pre-trained encoders)")
    run_args = dict(ckpt["args"])
    linear_probe = ckpt["task"] == "linprobe"
    model, args_ns = build_classifier(run_args, linear_probe)
    model.load_state_dict(ckpt["model"], strict=True)
    state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    single = results.get("kind") == "single-label"
    classes = results["classes"] if single else results["findings"]
    mean, std = norm_stats_for(SOURCE_OF[args_ns.dataset], args_ns.norm_stats, args_ns.in_chans)
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    atomic_save(state, outputs[0])
    write_safetensors(state, outputs[1])
    reloaded, _ = build_classifier(run_args, linear_probe)
    reloaded.load_state_dict(torch.load(outputs[0], weights_only=True), strict=True)
    probe = torch.randn(2, args_ns.in_chans, args_ns.input_size, args_ns.input_size)
    with torch.no_grad():
        torch.testing.assert_close(reloaded.eval()(probe), model.eval()(probe), rtol=0, atol=0)
    test = results["test"]
    sidecar = {
        "model": args_ns.model, "task": ckpt["task"], "builder": "main_finetune_chestxray.build_classifier",
        "num_classes": args_ns.nb_classes, "global_pool": getattr(args_ns, "global_pool", None),
        "classes" if single else "findings": classes,
        "activation": "softmax over the logits" if single else "sigmoid per finding",
        "decision": "argmax" if single else "score >= threshold, per finding",
        "input_size": args_ns.input_size, "in_chans": args_ns.in_chans,
        "normalization": {"mean": mean, "std": std, "norm_stats": args_ns.norm_stats},
        "eval_transform": ("timm create_transform: resize to input_size / 0.875, centre crop"
                           if args_ns.build_timm_transform else
                           "Resize(input_size * 256 / 224) of the shorter side, CenterCrop(input_size)"),
        "selected_epoch": results.get("selected_epoch"), "selected_by": results.get("selected_by"),
        "test": {k: test.get(k) for k in ("list", "images", "mean_auroc", "mean_auroc_ci95", "accuracy",
                                          "accuracy_ci95") if k in test},
        "thresholds": None if single else {
            "chosen_on": "val_predictions.csv (the selected weights on the validation list)",
            "target_sensitivity": args.target_sensitivity,
            "per_finding": thresholds_from_validation(args.run, args.target_sensitivity)},
        "run": os.path.abspath(args.run), "checkpoint": os.path.abspath(best), "git_commit": git_commit(short=False),
    }
    write_json(outputs[2], sidecar)
    print(f"wrote {outputs[0]}, {outputs[1]} ({len(state)} tensors; reloaded logits identical) and {outputs[2]}"
          + ("" if single else f" (thresholds of {len(classes)} findings, chosen on validation)"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
