"""Fine-tuning and linear probing: splits and label fractions, checkpoint loading, the honest protocol (selection by
validation, the test list read and scored once), gathered predictions across ranks, the reference's FINETUNE.md
commands, pre-emption and resume."""
import argparse
import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
from collections import Counter

import numpy as np
import pandas as pd
import pytest
import torch

import engine_finetune
import main_finetune_chestxray as ft_main
import models_cnn
import models_mae
import models_mae_cnn
import models_vit
from data import labelled
from data.synthetic import make_chexpert, make_nih_labelled
from tests.helpers import ROOT, argv, child_env, picture, run_cli, spawn, tensorboard_scalars, wait_for_line
from util.args import validate_args
from util.checkpoint import load_checkpoint

FT_SCRIPT = str(ROOT / "main_finetune_chestxray.py")
LP_SCRIPT = str(ROOT / "main_linprobe_chestxray.py")
REFERENCE_DOC = ROOT.parent / "shared" / "reference" / "FINETUNE.reference.md"
COPY = ROOT / "tests" / "reference_finetune_commands.md"
REFERENCE_COMMANDS = dict(re.findall(r"^```([a-z0-9_]+)\n(.*?)^```", COPY.read_text(), re.S | re.M))


def parse(flags: list[str], linear_probe: bool = False) -> argparse.Namespace:
    return argparse.ArgumentParser(parents=[ft_main.get_args_parser(linear_probe)]).parse_args(flags)


def nih_flags(lists: dict, root: str, out: str, **extra) -> list[str]:
    flags = {"data_path": root, "train_list": lists["train"], "val_list": lists["val"], "test_list": lists["test"],
             "model": "vit_debug_patch16", "input_size": 32, "batch_size": 4, "warmup_epochs": 0, "num_workers": 0,
             "device": "cpu", "output_dir": out, "log_dir": out, "print_freq": 50, "bootstrap": 20, **extra}
    return argv(flags)


@pytest.fixture(scope="module")
def nih(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("nih_labelled"))
    return root, make_nih_labelled(root, patients=(8, 3, 3), size=(32, 32))


# ---- splits ---------------------------------------------------------------------------------------------------

def test_label_fractions_are_whole_patients_reproducible_and_disjoint(nih, tmp_path):
    root, lists = nih
    args = parse(nih_flags(lists, root, str(tmp_path)))
    splits = labelled.build_splits(args)
    assert splits["test"].labels is None  # only the test names are read before training
    drawn = [labelled.label_fraction(splits["train"], 0.3, 7, str(tmp_path)) for _ in range(2)]
    assert np.array_equal(drawn[0].paths, drawn[1].paths)  # the same seed draws the same patients
    train_patients = set(splits["train"].patients)
    kept = set(drawn[0].patients)
    assert 0 < len(kept) < len(train_patients)
    for p in kept:  # whole patients: every image of a drawn patient, none of the others
        assert (drawn[0].patients == p).sum() == (splits["train"].patients == p).sum()
    assert not kept & (set(splits["val"].patients) | set(splits["test"].patients))
    assert len(drawn[0]) >= 0.3 * len(splits["train"])
    other = labelled.label_fraction(splits["train"], 0.3, 8, str(tmp_path))
    assert not np.array_equal(other.paths, drawn[0].paths) or len(train_patients) < 3
    # the written list reproduces the split when passed back as --train_list
    again = labelled.build_splits(parse(nih_flags({**lists, "train": drawn[0].source}, root, str(tmp_path))))
    assert np.array_equal(again["train"].paths, drawn[0].paths)
    np.testing.assert_array_equal(again["train"].labels, drawn[0].labels)


def test_bad_lists_fail_before_training_naming_the_file(nih, tmp_path):
    root, lists = nih
    leaky = tmp_path / "val_leaky.txt"
    leaky.write_text(open(lists["val"]).read() + open(lists["train"]).readline())
    with pytest.raises(ValueError, match=r"share 1 patient"):
        labelled.build_splits(parse(nih_flags({**lists, "val": str(leaky)}, root, str(tmp_path))))
    unlabelled = tmp_path / "names_only.txt"
    unlabelled.write_text("".join(line.split()[0] + "\n" for line in open(lists["train"])))
    with pytest.raises(ValueError, match=r"names_only.txt, line 1: expected an image name and 14"):
        labelled.build_splits(parse(nih_flags({**lists, "train": str(unlabelled)}, root, str(tmp_path))))
    missing = tmp_path / "missing.txt"
    missing.write_text("00999999_000.png" + " 0" * 14 + "\n")
    with pytest.raises(FileNotFoundError, match=r"1 of 1 images of the test list .*missing.txt are missing"):
        labelled.build_splits(parse(nih_flags({**lists, "test": str(missing)}, root, str(tmp_path))))


def test_chexpert_findings_uncertainty_policy_and_held_out_validation(tmp_path):
    make_chexpert(str(tmp_path), n_patients=24)
    args = parse(["--dataset", "chexpert", "--nb_classes", "5", "--data_path", str(tmp_path),
                  "--chexpert_uncertain", "Edema=ones"])
    splits = labelled.build_splits(args)
    train_csv = pd.read_csv(tmp_path / "CheXpert-v1.0-small" / "train.csv", dtype=str, keep_default_na=False)
    frontal = train_csv[train_csv["Frontal/Lateral"] == "Frontal"].reset_index(drop=True)
    train, val = splits["train"], splits["val"]
    assert len(train) + len(val) == len(frontal) and len(val) > 0
    assert not set(train.patients) & set(val.patients) and not set(val.patients) & set(splits["test"].patients)
    rows = {p: k for k, p in enumerate(labelled.chexpert.image_paths(
        str(tmp_path / "CheXpert-v1.0-small"), str(tmp_path / "CheXpert-v1.0-small" / "train.csv"),
        labelled.chexpert.relative_paths(frontal)))}
    seen_uncertain = set()
    for path, got in zip(train.paths, train.labels):
        row = frontal.iloc[rows[path]]
        for name, value in zip(labelled.CHEXPERT_FINDINGS, got):
            cell = row[name]
            expected = 1.0 if cell == "1.0" or (cell == "-1.0" and name == "Edema") else 0.0
            seen_uncertain |= {name} if cell == "-1.0" else set()
            assert value == expected, (path, name, cell)
    assert {"Edema", "Atelectasis"} <= seen_uncertain  # both policies were exercised
    # the logits' order is the reference's, so a CheXpert head moves between the codebases
    reference_order = ["Cardiomegaly", "Edema", "Consolidation", "Atelectasis", "Pleural Effusion"]
    assert labelled.findings(argparse.Namespace(dataset="chexpert")) == reference_order
    assert labelled.uncertain_policy(labelled.DEFAULT_UNCERTAIN) == {
        "Atelectasis": "ones", "Cardiomegaly": "zeros", "Consolidation": "zeros", "Edema": "ones",
        "Pleural Effusion": "zeros"}
    with pytest.raises(ValueError, match="--chexpert_uncertain: 'Edema=maybe'"):
        labelled.uncertain_policy("Edema=maybe")


# ---- checkpoint loading ---------------------------------------------------------------------------------------

def test_vit_loads_every_format_with_a_report(runs, tmp_path):
    mae = load_checkpoint(runs["vit"])  # this project's pre-training checkpoint (mae_vit_debug_patch16, 64 px)
    encoder = models_mae.to_timm_state_dict(mae["model"])  # what tools/export_encoder.py writes
    timm_like = {**encoder, "head.weight": torch.zeros(1000, 64), "head.bias": torch.zeros(1000)}  # ImageNet-style
    for source in (mae, encoder, {"state_dict": timm_like}):
        model = models_vit.create_model("vit_debug_patch16", 14, img_size=32, in_chans=1)
        report = models_vit.load_pretrained(model, source)
        assert sorted(report["missing"]) == ["fc_norm.bias", "fc_norm.weight", "head.bias", "head.weight"]
        assert "norm.weight" in report["ignored"]  # global pooling replaces the final norm with fc_norm
        assert any("pos_embed (resampled" in a for a in report["adapted"])
        assert any("patch_embed.proj.weight (channels 3 -> 1)" == a for a in report["adapted"])
        torch.testing.assert_close(model.blocks[1].mlp.fc2.weight, mae["model"]["blocks.1.mlp.fc2.weight"])
    assert any(k.startswith("decoder_") for k in models_vit.load_pretrained(
        models_vit.create_model("vit_debug_patch16", 14, img_size=64), mae)["ignored"])
    with pytest.raises(ValueError, match=r"shapes differ"):
        models_vit.load_pretrained(models_vit.create_model("vit_small_patch16", 14, img_size=32), mae)
    partial = {k: v for k, v in encoder.items() if not k.startswith("blocks.1.")}  # e.g. a shallower encoder
    with pytest.raises(ValueError, match=r"lacks 12 encoder tensor\(s\) of this model, e.g. blocks.1.norm1.weight"):
        models_vit.load_pretrained(models_vit.create_model("vit_debug_patch16", 14, img_size=64), partial)


def test_cnn_loads_smp_encoder_unet_checkpoint_export_and_torchvision_strictly(runs):
    unet = load_checkpoint(runs["cnn"])  # densenet121 U-Net pre-training checkpoint
    smp_encoder = {k.removeprefix("model.encoder."): v for k, v in unet["model"].items()
                   if k.startswith("model.encoder.")}  # the reference's --checkpoint_type smp_encoder format
    _, export = models_mae_cnn.to_torchvision_state_dict(smp_encoder, "densenet121")
    torchvision_full = {**smp_encoder, "classifier.weight": torch.zeros(1000, 1024),
                        "classifier.bias": torch.zeros(1000)}
    for source in (unet, smp_encoder, export, torchvision_full):
        model = models_cnn.create_model("densenet121", 14)
        report = models_cnn.load_pretrained(model, source)
        assert sorted(report["missing"]) == ["classifier.bias", "classifier.weight"], report["missing"]
        torch.testing.assert_close(model.features.denseblock4.denselayer16.conv2.weight,
                                   smp_encoder["features.denseblock4.denselayer16.conv2.weight"])
    one = models_cnn.create_model("densenet121", 14, in_chans=1)
    report = models_cnn.load_pretrained(one, smp_encoder)
    assert report["adapted"] == ["features.conv0.weight (channels 3 -> 1)"]
    with pytest.raises(ValueError, match=r"lacks \d+ backbone tensor\(s\) of resnet50, e.g. conv1.weight"):
        models_cnn.load_pretrained(models_cnn.create_model("resnet50", 14), smp_encoder)  # a DenseNet file
    partial = {k: v for k, v in smp_encoder.items() if "denseblock4" not in k}
    with pytest.raises(ValueError, match=r"lacks \d+ backbone tensor\(s\) of densenet121, e.g. features.denseblock4"):
        models_cnn.load_pretrained(models_cnn.create_model("densenet121", 14), partial)


def test_vit_layer_decay_and_weight_decay_groups_are_maes():
    """timm's param_groups_layer_decay gives MAE's scales: embeddings layer_decay^(L+1), block i layer_decay^(L-i),
    the head 1; no decay for 1-D tensors, cls_token and pos_embed. The probe's LARS trains the head alone."""
    args = parse(["--model", "vit_debug_patch16", "--input_size", "32", "--layer_decay", "0.5"])
    args.lr = 1e-3
    classifier = ft_main.build_classifier(args)
    names = {id(p): n for n, p in classifier.model.named_parameters()}
    depth = len(classifier.model.blocks)
    seen = 0
    for group in engine_finetune.build_optimizer(args, classifier, linear_probe=False).param_groups:
        for param in group["params"]:
            name = names[id(param)]
            layer = (0 if name.startswith(("cls_token", "pos_embed", "patch_embed")) else
                     int(name.split(".")[1]) + 1 if name.startswith("blocks.") else depth + 1)
            assert group["lr_scale"] == 0.5 ** (depth + 1 - layer), name
            no_decay = param.ndim == 1 or name in ("cls_token", "pos_embed")
            assert group["weight_decay"] == (0.0 if no_decay else args.weight_decay), name
            seen += 1
    assert seen == len(names)
    probe_args = parse(["--model", "vit_debug_patch16", "--input_size", "32"], linear_probe=True)
    probe_args.lr = 0.1
    probe = ft_main.build_classifier(probe_args, linear_probe=True)
    optimizer = engine_finetune.build_optimizer(probe_args, probe, linear_probe=True)
    trained = {id(p) for g in optimizer.param_groups for p in g["params"]}
    assert type(optimizer).__name__ == "Lars" and trained == {id(p) for p in probe.head.parameters()}


# ---- the protocol, end to end ---------------------------------------------------------------------------------

AUDIT = r"""
import os, sys
_names = set(open(os.environ["AUDIT_TEST_NAMES"]).read().split())
_log, _run_log = os.environ["AUDIT_LOG"], os.environ["AUDIT_RUN_LOG"]

def _hook(event, args):
    if event == "open" and isinstance(args[0], (str, bytes)):
        path = os.fsdecode(args[0])
        if os.path.basename(path) in _names:
            epochs = sum(1 for _ in open(_run_log)) if os.path.exists(_run_log) else 0
            with open(_log, "a") as f:
                f.write(f"{os.path.basename(path)} {epochs}\n")

sys.addaudithook(_hook)
"""


def _mirrored_validation(root: str, lists: dict, tmp_path) -> str:
    """A validation list of copies of the test images (new names, new patients) with every label inverted: its
    AUROC is 1 - the test AUROC at every epoch, so the epoch validation picks is the one the test set likes least."""
    lines = []
    for k, line in enumerate(open(lists["test"])):
        name, *values = line.split()
        copy = f"{200000 + k:08d}_000.png"
        shutil.copyfile(os.path.join(root, "images", name), os.path.join(root, "images", copy))
        lines.append(" ".join([copy, *(str(1 - int(v)) for v in values)]))
    path = tmp_path / "val_mirror.txt"
    path.write_text("\n".join(lines) + "\n")
    return str(path)


@pytest.mark.slow
def test_validation_selects_and_the_test_list_is_read_once_at_the_end(nih, tmp_path):
    root, lists = nih
    out = tmp_path / "out"
    names = tmp_path / "test_names.txt"
    names.write_text("".join(line.split()[0] + "\n" for line in open(lists["test"])))
    (tmp_path / "audit").mkdir()
    (tmp_path / "audit" / "sitecustomize.py").write_text(AUDIT)
    flags = nih_flags({**lists, "val": _mirrored_validation(root, lists, tmp_path)}, root, str(out), epochs=4,
                      blr=0.05, eval_interval=1, drop_path=0.0, mixup=0.8, cutmix=1.0, smoothing=0.1)
    env = child_env(PYTHONPATH=f"{tmp_path / 'audit'}{os.pathsep}{ROOT}", AUDIT_TEST_NAMES=names,
                    AUDIT_LOG=tmp_path / "opens.txt", AUDIT_RUN_LOG=out / "log.txt")
    proc = run_cli([sys.executable, FT_SCRIPT, *flags], env=env, timeout=300)
    results = json.loads((out / "results.json").read_text())
    history = results["val_history"]
    assert [e for e, _ in history] == [0, 1, 2, 3] and len({v for _, v in history}) > 1, proc.output
    best_epoch, best_val = max(history, key=lambda h: h[1])
    assert results["selected_epoch"] == best_epoch and results["val_mean_auroc"] == pytest.approx(best_val)
    assert load_checkpoint(str(out / "checkpoint-best.pth"))["epoch"] == best_epoch
    # the test set disagrees: it is scored on the validation-selected epoch, not on its own best one
    assert results["test"]["mean_auroc"] == pytest.approx(1 - best_val, abs=1e-6), proc.output
    assert results["test"]["mean_auroc"] < max(1 - v for _, v in history)
    # every test image was scored exactly once, after the last epoch's line was in log.txt (one decode opens the
    # file twice: image_io's DICOM sniff, then PIL); before training, --check_images sample decoded each of these 6
    # once to check the file, reading no label and scoring nothing; no other open of a test image happened
    opens = [line.split() for line in (tmp_path / "opens.txt").read_text().splitlines()]
    at_start = Counter(n for n, epochs in opens if int(epochs) == 0)
    scored = Counter(n for n, epochs in opens if int(epochs) == 4)
    assert at_start == scored == dict.fromkeys(names.read_text().split(), 2), opens
    assert len(opens) == 24, opens
    assert "test AUROC on" in proc.stdout and "95% CI from 20 patient resamples" in proc.stdout
    rocs = sorted((out / "roc").glob("roc_*.png"))
    assert len(rocs) == 14 and all(picture(p, 100, 100) is not None for p in rocs)
    picture(out / "val_auroc.png", 100, 100)
    assert tensorboard_scalars(out)["val_auroc"] == pytest.approx([v for _, v in history])  # TensorBoard
    predictions = pd.read_csv(out / "test_predictions.csv")
    assert len(predictions) == results["test"]["images"] == 6
    # the selected weights on the validation list (for thresholds chosen there): its AUROC is the selecting score
    from util.metrics import mean_auroc, per_finding_auroc
    val = pd.read_csv(out / "val_predictions.csv")
    val_auroc = mean_auroc(per_finding_auroc(val[[f"{f} score" for f in results["findings"]]].to_numpy(),
                                             val[[f"{f} label" for f in results["findings"]]].to_numpy()))
    assert val_auroc == pytest.approx(results["val_mean_auroc"], abs=1e-6)
    # a second run of the same command finds the run complete and does not score the test set again
    again = run_cli([sys.executable, FT_SCRIPT, *flags], env=env, timeout=300)
    assert "this run is complete" in again.stdout and len((tmp_path / "opens.txt").read_text().splitlines()) == 24


@pytest.mark.slow
def test_linear_probe_on_chexpert_trains_only_the_head_and_resumes_after_preemption(runs, tmp_path):
    make_chexpert(str(tmp_path / "data"), n_patients=24, size=(64, 64))
    out = tmp_path / "out"
    flags = ["--dataset", "chexpert", "--nb_classes", "5", "--data_path", str(tmp_path / "data"),
             "--model", "vit_debug_patch16", "--finetune", runs["vit"], "--in_chans", "1", "--input_size", "32",
             "--batch_size", "2", "--epochs", "3", "--warmup_epochs", "1", "--num_workers", "0", "--device", "cpu",
             "--output_dir", str(out), "--log_dir", str(out), "--print_freq", "1", "--bootstrap", "10",
             "--label_fraction", "0.5"]
    proc = spawn([sys.executable, LP_SCRIPT, *flags])
    wait_for_line(proc, r"Epoch: \[1\]\s+\[\s*1/")
    proc.send_signal(signal.SIGTERM)
    first = proc.communicate(timeout=120)[0]
    assert proc.returncode == 3, first
    midway = load_checkpoint(str(out / "checkpoint-last.pth"))["model"]
    resumed = run_cli([sys.executable, LP_SCRIPT, *flags], timeout=300)
    assert re.search(r"resumed from .*checkpoint-last.pth: epoch 1, step [1-9]", resumed.stdout), resumed.output
    results = json.loads((out / "results.json").read_text())
    assert results["task"] == "linprobe" and list(results["test"]["per_finding"]) == labelled.CHEXPERT_FINDINGS
    fraction_list = out / "train_50pct_seed0.csv"
    assert results["train_list"] == str(fraction_list) and fraction_list.is_file()
    best = load_checkpoint(str(out / "checkpoint-best.pth"))["model"]
    pretrained = models_mae.to_timm_state_dict(load_checkpoint(runs["vit"])["model"], 32, 1)
    for key, value in pretrained.items():  # the frozen encoder is exactly the pre-trained one
        if key in best:
            torch.testing.assert_close(best[key], value, rtol=0, atol=0, msg=key)
    # the head went on training after the resume, and nothing else did (the BatchNorm before it keeps statistics)
    final = load_checkpoint(str(out / "checkpoint-last.pth"))["model"]
    assert not torch.equal(final["head.1.weight"], midway["head.1.weight"])
    assert not torch.equal(final["head.1.bias"], midway["head.1.bias"])
    for key, value in final.items():
        if not key.startswith("head."):
            torch.testing.assert_close(value, midway[key], rtol=0, atol=0, msg=key)


@pytest.mark.slow
def test_finetuning_has_the_shared_runs_checkpoints_records_and_warnings(nih, tmp_path, caplog):
    """What fine-tuning gains from the shared engine: mid-epoch checkpoints (--save_every_steps), periodic ones pruned
    by --keep_last, the resolved-run record with the git commit, images/s and the data-wait share per epoch, and the
    warning when a checkpoint of another world size resumes (its RNG streams restart)."""
    root, lists = nih
    out = tmp_path / "out"
    flags = nih_flags(lists, root, str(out), epochs=2, save_every_steps=1, save_freq=1, keep_last=1, bootstrap=0)
    caplog.set_level("INFO")
    assert ft_main.main(flags) == 0
    resolved = json.loads(re.search(r"resolved run: (\{.*\})", caplog.text).group(1))
    assert resolved["task"] == "finetune" and resolved["eff_batch_size"] == 4 and resolved["git"]
    steps = resolved["steps_per_epoch"]
    assert steps > 1 and len(re.findall(r"all \d+ ranks hold", caplog.text)) == 0  # one process: no comparison
    lines = [json.loads(line) for line in (out / "log.txt").read_text().splitlines()]
    assert [line["epoch"] for line in lines] == [0, 1]
    assert all(line["train_images_per_s"] > 0 and 0 <= line["train_data_wait_fraction"] <= 1 for line in lines)
    assert sorted(p.name for p in out.glob("checkpoint-*.pth")) == ["checkpoint-1.pth", "checkpoint-best.pth",
                                                                    "checkpoint-last.pth"]
    assert load_checkpoint(str(out / "checkpoint-last.pth"))["optimizer_steps"] == 2 * steps
    # a mid-epoch checkpoint of a 2-process run resumes here, in one process: said, then the epoch goes on
    ckpt = load_checkpoint(str(out / "checkpoint-last.pth"))
    ckpt.update(epoch=1, step=1, world_size=2, rng=[ckpt["rng"][0]] * 2)
    torch.save(ckpt, out / "checkpoint-last.pth")
    (out / "results.json").unlink()
    caplog.clear()
    assert ft_main.main(flags) == 0
    assert "checkpoint was written by 2 processes, this run has 1: RNG streams restart from the seed" in caplog.text
    assert re.search(r"resumed from .*checkpoint-last.pth: epoch 1, step 1", caplog.text)


# ---- the reference's FINETUNE.md -------------------------------------------------------------------------------

def test_reference_copy_is_the_published_document():
    assert sorted(REFERENCE_COMMANDS) == ["densenet121", "vit_s"]
    if not REFERENCE_DOC.is_file():
        assert not os.environ.get("CI"), f"{REFERENCE_DOC} must be beside the checkout on CI"
        pytest.skip(f"{REFERENCE_DOC} is not beside this checkout; {COPY.name} stands in")
    blocks = re.findall(r"^```[a-z0-9_]*\n(.*?)^```", REFERENCE_DOC.read_text(), re.S | re.M)
    assert sorted(blocks) == sorted(REFERENCE_COMMANDS.values())


def _reference_args(name: str) -> argparse.Namespace:
    tokens = shlex.split(REFERENCE_COMMANDS[name].replace("\\\n", " "))
    script = next(t for t in tokens if t.endswith(".py"))
    return parse(tokens[tokens.index(script) + 1:])


def test_finetune_md_and_slurm_recipes_are_the_reference_commands():
    ours = (ROOT / "FINETUNE.md").read_text()
    for name, command in REFERENCE_COMMANDS.items():
        assert command in ours, f"FINETUNE.md lacks the reference {name} command exactly as published"
    where = {"output_dir", "log_dir", "data_path", "finetune", "train_list", "val_list", "test_list", "device",
             "num_workers"}
    for recipe, name in (("finetune_vit_s", "vit_s"), ("finetune_densenet121", "densenet121")):
        show = 'source scripts/recipes.sh && printf "%s\\n" "$SCRIPT" "${RECIPE_ARGS[@]}"'
        env = {**os.environ, "RECIPE": recipe, "PRETRAINED": "w.pth"}
        out = subprocess.run(["bash", "-c", show], cwd=ROOT, env=env, capture_output=True, text=True,
                             check=True).stdout.splitlines()
        assert out[0] == "main_finetune_chestxray.py"
        ours_args, ref = parse(out[1:]), _reference_args(name)
        differ = {k for k in vars(ref) if getattr(ours_args, k) != getattr(ref, k)} - where
        assert not differ, {k: (getattr(ours_args, k), getattr(ref, k)) for k in differ}
    # COVIDx and NODE21 have no published command: their recipes are the ViT-S one on their task, passing every check
    for recipe, dataset, classes in (("finetune_covidx_vit_s", "covidx", 4), ("finetune_node21_vit_s", "node21", 1)):
        show = 'source scripts/recipes.sh && printf "%s\\n" "$SCRIPT" "${RECIPE_ARGS[@]}"'
        env = {**os.environ, "RECIPE": recipe, "PRETRAINED": "w.pth"}
        out = subprocess.run(["bash", "-c", show], cwd=ROOT, env=env, capture_output=True, text=True,
                             check=True).stdout.splitlines()
        task_args, vit_s = parse(out[1:]), _reference_args("vit_s")
        differ = {k for k in vars(vit_s) if getattr(task_args, k) != getattr(vit_s, k)} - where
        assert differ == {"dataset", "nb_classes"} and (task_args.dataset, task_args.nb_classes) == (dataset, classes)
        validate_args(task_args, engine_finetune.check_args(task_args) + ft_main.check_model_args(task_args))


SHRUNK = {"--nproc_per_node=8": "--nproc_per_node=2", "--batch_size 128": "--batch_size 2",
          "--epochs 75": "--epochs 1", "--num_workers 4": "--num_workers 0"}


@pytest.mark.slow
@pytest.mark.parametrize("recipe", ["densenet121", "vit_s"])
def test_reference_finetune_command_runs_with_sizes_shrunk(nih, runs, tmp_path, free_port, recipe, caplog):
    """The published command on two gloo ranks, sizes shrunk; for the ViT, --eval in one process then scores the
    selected checkpoint again: the same AUROC, so the two ranks' predictions were gathered, none twice."""
    root, lists = nih
    test_list = tmp_path / "test_odd.txt"  # 5 images: the ranks score 3 and 2
    test_list.write_text("".join(open(lists["test"]).readlines()[:5]))
    if recipe == "densenet121":  # the reference's CNN checkpoints are SMP encoder state dicts
        unet = load_checkpoint(runs["cnn"])["model"]
        torch.save({k.removeprefix("model.encoder."): v for k, v in unet.items() if k.startswith("model.encoder.")},
                   tmp_path / "densenet121_CXR_0.3M_mae.pth")
    else:  # its ViT checkpoints are MAE checkpoints, args pickled as a Namespace
        mae = models_mae.create_model("mae_vit_small_patch16_dec512d2b")
        torch.save({"model": mae.state_dict(), "epoch": 799, "args": argparse.Namespace(model="mae_vit_small")},
                   tmp_path / "vit-s_CXR_0.3M_mae.pth")
    command = REFERENCE_COMMANDS[recipe]
    for full, small in SHRUNK.items():
        assert full in command
        command = command.replace(full, small)
    command = command.replace("python -m", f"{shlex.quote(sys.executable)} -m").rstrip("\n")
    command += " \\\n --input_size 64 --bootstrap 20 --print_freq 50"
    save = tmp_path / "save"
    env = child_env(SAVE_DIR=save, DATASET_DIR=root, TRAIN_LIST=lists["train"], VAL_LIST=lists["val"],
                    TEST_LIST=test_list, PET_MASTER_PORT=free_port, PYTHONPATH=ROOT)
    os.symlink(FT_SCRIPT, tmp_path / "main_finetune_chestxray.py")  # the command runs it from the working directory
    proc = subprocess.run(["bash", "-c", command], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    output = f"$ {command}\n{proc.stdout[-6000:]}\n{proc.stderr[-6000:]}"
    assert proc.returncode == 0, output
    results = json.loads((save / "results.json").read_text())
    assert results["world_size"] == 2 and results["test"]["images"] == 5, output
    assert results["pretrained_keys"]["missing"] == (
        ["classifier.weight", "classifier.bias"] if recipe == "densenet121"
        else ["fc_norm.weight", "fc_norm.bias", "head.weight", "head.bias"]), output
    assert results["selected_epoch"] == 0 and "test AUROC on" in proc.stdout
    if recipe == "vit_s":
        flags = shlex.split(command.split("main_finetune_chestxray.py", 1)[1].replace("\\\n", " "))
        flags = [re.sub(r"\$\{(\w+)\}", lambda m: env[m.group(1)], f) for f in flags]
        alone = run_cli([sys.executable, FT_SCRIPT, *flags, "--eval", "--resume", str(save / "checkpoint-best.pth"),
                         "--output_dir", str(tmp_path / "eval"), "--log_dir", str(tmp_path / "eval")],
                        cwd=tmp_path, env=env, timeout=300)
        single = json.loads((tmp_path / "eval" / "results.json").read_text())
        assert single["world_size"] == 1
        assert single["test"]["per_finding"] == results["test"]["per_finding"], alone.output
        # scoring again into the fine-tuning folder would overwrite its results: refused before any compute
        assert ft_main.main([*flags, "--eval", "--resume", str(save / "checkpoint-best.pth"), "--device", "cpu"]) == 1
        assert "give the evaluation its own --output_dir" in caplog.text and "holds a run" in caplog.text


@pytest.mark.parametrize("weight_decay", [0.0, 0.05])
def test_linear_probe_lars_is_maes_rule_after_one_and_three_steps(weight_decay):
    """The probe's head after one and three LARS steps equals a transcription of MAE's rule to 1e-6, also at weight
    decay 0 (where timm's Lars leaves out the trust ratio, and the first step is orders of magnitude larger)."""
    from tests.reference_impl import reference_lars_steps

    args = parse(["--model", "vit_debug_patch16", "--input_size", "32", "--weight_decay", str(weight_decay)],
                 linear_probe=True)
    args.lr = 0.1 * 512 / 256
    torch.manual_seed(0)
    probe = ft_main.build_classifier(args, linear_probe=True)
    optimizer = engine_finetune.build_optimizer(args, probe, linear_probe=True)
    head = [p for p in probe.model.parameters() if p.requires_grad]
    assert {p.ndim for p in head} == {1, 2}  # a weight (trust ratio) and a bias (none)
    start = [p.detach().clone() for p in head]
    images, targets = torch.randn(8, 3, 32, 32), (torch.rand(8, 14) > 0.7).float()
    grads, lrs = [], [args.lr, args.lr * 0.9, args.lr * 0.5]
    for lr in lrs:
        for group in optimizer.param_groups:
            group["lr"] = lr
        optimizer.zero_grad()
        torch.nn.functional.binary_cross_entropy_with_logits(probe.model(images), targets).backward()
        grads.append([p.grad.detach().clone() for p in head])
        optimizer.step()
        if len(grads) in (1, 3):
            expected = reference_lars_steps(start, grads, lrs[:len(grads)], weight_decay)[-1]
            for ours, theirs in zip(head, expected):
                torch.testing.assert_close(ours.detach().double(), theirs, rtol=0, atol=1e-6)
    if weight_decay == 0.0:  # timm's Lars, for contrast: no trust ratio at weight decay 0, a far larger first step
        from timm.optim import Lars as TimmLars

        copies = [w.clone().requires_grad_(True) for w in start]
        timm_lars = TimmLars(copies, lr=lrs[0], weight_decay=0.0, momentum=0.9)
        for w, g in zip(copies, grads[0]):
            w.grad = g.clone()
        timm_lars.step()
        ours_first = reference_lars_steps(start, grads[:1], lrs[:1], 0.0)[-1][0]
        assert (copies[0].detach() - start[0]).norm() > 10 * (ours_first.float() - start[0]).norm()


def test_randaugment_is_seeded_per_sample_so_a_resumed_epoch_augments_the_same(nih):
    """With --build_timm_transform and --aa, an item's augmentation depends on its per-sample seed alone: the same
    seed gives the same tensor whatever the global RNGs hold (as after a resume), RandAugment's choice of operations
    (NumPy) included; another seed gives another; and the global RNGs are left as they were."""
    import random

    root, lists = nih
    args = parse(nih_flags(lists, root, "unused", build_timm_transform=True, aa="rand-m9-mstd0.5-inc1", reprob=0.0))
    split = labelled.build_splits(args)["train"]
    dataset = labelled.LabelledDataset(split, labelled.build_transform(args, is_train=True), args.dataset)

    def item(seed: int, global_seed: int) -> torch.Tensor:
        random.seed(global_seed)  # whatever the process's RNGs hold when the sample comes (a resume, a worker)
        np.random.seed(global_seed)
        torch.manual_seed(global_seed)
        return dataset[(0, seed)][0]

    seeds = range(12)  # RandAugment skips each chosen operation half the time: several seeds exercise the choice
    for seed in seeds:
        assert torch.equal(item(seed, 1), item(seed, 2)), seed
    assert len({item(seed, 1).sum().item() for seed in seeds}) > 1  # the seed does change the augmentation
    random.seed(99)
    np.random.seed(99)
    torch.manual_seed(99)
    before = (random.getstate(), np.random.get_state()[1].copy(), torch.get_rng_state())
    dataset[(0, 1234)]
    after = (random.getstate(), np.random.get_state()[1], torch.get_rng_state())
    assert before[0] == after[0] and np.array_equal(before[1], after[1]) and torch.equal(before[2], after[2])


@pytest.mark.parametrize("name", ["densenet121", "resnet18"])
def test_cnn_classifiers_run_channels_last_and_compute_what_nchw_does(name):
    """CNN fine-tuning and probing run NHWC like the U-Net pre-training: the activations of the first and last
    convolutions are channels_last (seen through hooks), and the logits equal the same weights run NCHW."""
    model = models_cnn.create_model(name, 14).double().eval()
    convs = [m for m in model.modules() if isinstance(m, torch.nn.Conv2d)]
    seen = []
    hooks = [c.register_forward_hook(lambda m, i, o: seen.append((i[0], o))) for c in convs[:2] + convs[-2:]]
    images = torch.randn(2, 3, 64, 64, dtype=torch.float64)
    with torch.no_grad():
        logits = model(images)
    for hook in hooks:
        hook.remove()
    assert len(seen) == 4 and all(t.is_contiguous(memory_format=torch.channels_last) for pair in seen for t in pair)
    reference = models_cnn.MODELS.get(name)(num_classes=14).double().eval()
    reference.load_state_dict(model.state_dict())  # the same keys and values
    with torch.no_grad():
        torch.testing.assert_close(logits, reference(images), rtol=1e-9, atol=1e-9)


def test_reference_flags_are_accepted_moot_or_refused_with_the_reason(tmp_path):
    """--dist_eval is accepted (predictions are always gathered); --color_jitter reaches timm's transform as MAE
    passes it (none by default, where timm's own default would jitter by 0.4 without RandAugment); --repeated-aug and
    --ThreeAugment are refused with the reason."""
    base = ["--model", "vit_debug_patch16", "--input_size", "32", "--build_timm_transform", "--aa", "none"]
    args = parse([*base, "--dist_eval"])
    assert args.dist_eval and engine_finetune.check_args(args) == []

    def steps(extra):
        timm_part = labelled.build_transform(parse([*base, *extra]), True).transforms[1]
        return [type(t).__name__ for t in timm_part.transforms]

    assert "ColorJitter" not in steps([]) and "ColorJitter" in steps(["--color_jitter", "0.4"])
    for flag in ("--repeated-aug", "--ThreeAugment"):
        problems = engine_finetune.reference_flag_problems(parse([*base, flag]), linear_probe=False)
        assert any("not supported in fine-tuning here" in p for p in problems), problems
    # the reference's other switches: accepted at what this project does, refused otherwise naming the flag
    assert engine_finetune.reference_flag_problems(parse([*base, "--optimizer", "adamw", "--aug_strategy",
                                                          "default"]), linear_probe=False) == []
    assert engine_finetune.reference_flag_problems(parse([*base, "--optimizer", "lars"], linear_probe=True),
                                                   linear_probe=True) == []
    for extra, linear_probe, message in [
            (["--optimizer", "sgd"], False, "--optimizer sgd: this script trains with adamw"),
            (["--optimizer", "adamw"], True, "--optimizer adamw: this script trains with lars"),
            (["--loss_func", "focal"], False, "--loss_func focal: the loss follows the task"),
            (["--aug_strategy", "strong"], False, "--aug_strategy strong: only 'default' is supported"),
            (["--src"], False, "--src is a reference flag that is not supported"),
            (["--resplit"], True, "--resplit is not supported")]:
        args = parse([*base, *extra], linear_probe=linear_probe)
        assert any(message in p for p in engine_finetune.reference_flag_problems(args, linear_probe)), extra
    with pytest.raises(SystemExit, match="--src is a reference flag that is not supported"):
        ft_main.main([*base, "--src", "--device", "cpu", "--output_dir", str(tmp_path / "o")])
    assert not (tmp_path / "o").exists()  # refused before anything is written


@pytest.mark.slow
def test_an_exclude_list_reports_its_images_apart_in_a_multi_label_run(nih, tmp_path):
    root, lists = nih
    names = [line.split()[0] for line in open(lists["test"]).read().splitlines()]
    (tmp_path / "exclude.txt").write_text(f"images/{names[2]}\nimages/{names[3]}\n")  # path ends, as relative paths
    out = tmp_path / "out"
    assert ft_main.main(nih_flags(lists, root, str(out), epochs=1, exclude_list=tmp_path / "exclude.txt")) == 0
    test = json.loads((out / "results.json").read_text())["test"]
    assert test["images"] == 4 and test["excluded"]["images"] == 2 and test["excluded"]["names"] == names[2:4]
    assert set(test["excluded"]["metrics"]["per_finding"]) == set(labelled.nih.FINDINGS)
    assert len(pd.read_csv(out / "test_predictions_excluded.csv")) == 2
