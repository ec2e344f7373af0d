"""Bad input, as a hostile but realistic user gives it: each case ends in a clear one-line error naming the flag or
file and the fix, before any epoch is spent, and nothing already written changes (md5 of every earlier file).

Fine-tuning and the tools run in this process (their main()); the process boundary (exit code, no traceback) is
tested by tests/test_cli.py for every entry script and tool.
"""
import hashlib
import os
import re
import shutil

import pytest
import torch

import main_finetune_chestxray as ft_main
from data.synthetic import make_nih, make_nih_labelled
from tests.helpers import argv, run_main, run_tool_in_process

FLAGS = {"model": "vit_debug_patch16", "input_size": 32, "batch_size": 4, "warmup_epochs": 0, "num_workers": 0,
         "device": "cpu", "print_freq": 50, "bootstrap": 0, "epochs": 1}


def finetune_flags(lists: dict, root: str, out, **extra) -> list[str]:
    flags = {"data_path": root, "train_list": lists["train"], "val_list": lists["val"], "test_list": lists["test"],
             **FLAGS, "output_dir": str(out), "log_dir": str(out), **extra}
    return argv(flags)


def md5s(folder) -> dict:
    """Every file under `folder` and its md5: what a refused command must leave exactly as it was."""
    out = {}
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        out[str(path.relative_to(folder))] = hashlib.md5(path.read_bytes()).hexdigest()
    return out


@pytest.fixture(scope="module")
def nih(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("nih_labelled"))
    return root, make_nih_labelled(root, patients=(8, 3, 3), size=(32, 32))


@pytest.fixture(scope="module")
def finished(nih, tmp_path_factory):
    """A complete fine-tuning run (results.json written) and a pre-training-free interrupted one's sibling."""
    root, lists = nih
    out = tmp_path_factory.mktemp("finished") / "run"
    assert ft_main.main(finetune_flags(lists, root, out)) == 0
    return out


def run_finetune(argv, caplog) -> tuple[int, str]:
    return run_main(ft_main.main, argv, caplog)


def edited_list(path: str, tmp_path, name: str, edit) -> str:
    lines = open(path).read().splitlines()
    out = tmp_path / name
    out.write_text("\n".join(edit(lines)) + "\n")
    return str(out)


# (case, how to make the bad input from (lists, tmp_path), extra flags, the message); each must fail before training
LIST_CASES = [
    ("a duplicate line in the train list",
     lambda lists, tmp: {"train_list": edited_list(lists["train"], tmp, "train_dup.txt", lambda ls: ls + ls[:1])},
     r"--train_list \S+train_dup.txt lists 1 image\(s\) more than once: \S+ \(rows 1, \d+\)"),
    ("a duplicate line in the test list",
     lambda lists, tmp: {"test_list": edited_list(lists["test"], tmp, "test_dup.txt", lambda ls: ls + ls[-1:])},
     r"--test_list \S+test_dup.txt lists 1 image\(s\) more than once"),
    ("a 13-label line in the test list",
     lambda lists, tmp: {"test_list": edited_list(lists["test"], tmp, "test_13.txt",
                                                  lambda ls: [ls[0].rsplit(" ", 1)[0], *ls[1:]])},
     r"--test_list \S+test_13.txt, line 1: expected an image name and 14 0/1 labels"),
    ("an 'x' label in the validation list",
     lambda lists, tmp: {"val_list": edited_list(lists["val"], tmp, "val_x.txt",
                                                 lambda ls: [ls[0][:-1] + "x", *ls[1:]])},
     r"--val_list \S+val_x.txt, line 1: label 'x'; every label must be 0 or 1"),
    ("--label_fraction below one patient",
     lambda lists, tmp: {"label_fraction": "1e-9"},
     r"--label_fraction 1e-09 of the 8 patients of the training list .* is less than one patient"),
    ("--layer_decay 0", lambda lists, tmp: {"layer_decay": "0"}, r"--layer_decay must be in \(0, 1\], got 0"),
    ("--finetune on a text file",
     lambda lists, tmp: {"finetune": str(tmp / "notes.txt")}, r"--finetune \S+notes.txt: "),
    ("a name with a space in the validation list",
     lambda lists, tmp: {"val_list": edited_list(lists["val"], tmp, "val_space.txt",
                                                 lambda ls: [ls[0].replace(".png", " copy.png", 1), *ls[1:]])},
     r"--val_list \S+val_space.txt, line 1: expected an image name and 14 0/1 labels"),
    ("--finetune on a truncated checkpoint",
     lambda lists, tmp: {"finetune": str(tmp / "truncated.pth")}, r"--finetune \S+truncated.pth: "),
    ("--output_dir that is a file",
     lambda lists, tmp: {"output_dir": str(tmp / "notes.txt")}, r"--output_dir \S+notes.txt is a file, not a folder"),
]


@pytest.mark.parametrize("case, make, message", LIST_CASES, ids=[c[0] for c in LIST_CASES])
def test_bad_lists_and_flags_fail_before_training_naming_the_flag(nih, tmp_path, caplog, case, make, message):
    root, lists = nih
    (tmp_path / "notes.txt").write_text("not a checkpoint\n")
    torch.save({"model": {"w": torch.zeros(1000)}}, tmp_path / "truncated.pth")
    (tmp_path / "truncated.pth").write_bytes((tmp_path / "truncated.pth").read_bytes()[:900])
    out = tmp_path / "out"
    code, text = run_finetune(finetune_flags(lists, root, out, **make(lists, tmp_path)), caplog)
    assert code == 1, text
    assert re.search(message, text), text
    assert "Traceback" not in text and "Epoch: [0]" not in text  # before any training
    assert not (out / "checkpoint-last.pth").exists()


def test_a_byte_order_mark_is_not_part_of_the_first_name(nih, tmp_path):
    """Some editors start a UTF-8 file with a byte-order mark: every reader takes it off, so the first image is found
    under its name (before, the message was an 'ascii' codec error)."""
    from data import labelled
    root, lists = nih
    bom = edited_list(lists["train"], tmp_path, "train_bom.txt", lambda ls: ["\ufeff" + ls[0], *ls[1:]])
    assert labelled._nih_lines(bom) == labelled._nih_lines(lists["train"])
    assert open(bom, "rb").read(3) == b"\xef\xbb\xbf"


def test_another_runs_resume_into_a_finished_run_changes_nothing(nih, finished, tmp_path, caplog):
    root, lists = nih
    other = tmp_path / "other"
    assert ft_main.main(finetune_flags(lists, root, other, blr=0.01)) == 0
    target = tmp_path / "finished"
    shutil.copytree(finished, target)
    before = md5s(target)
    code, text = run_finetune(finetune_flags(lists, root, target, resume=other / "checkpoint-last.pth"), caplog)
    assert code == 1 and "holds another run" in text and "--resume: None there" in text, text
    assert "--resume_with_changes" in text and md5s(target) == before


def test_a_finished_run_asked_for_more_epochs_says_so_and_changes_nothing(nih, finished, tmp_path, caplog):
    root, lists = nih
    target = tmp_path / "finished"
    shutil.copytree(finished, target)
    before = md5s(target)
    code, text = run_finetune(finetune_flags(lists, root, target, epochs=2), caplog)
    assert code == 1 and "--epochs 2 would train on and score the test list again" in text, text
    assert md5s(target) == before
    code, text = run_finetune(finetune_flags(lists, root, target), caplog)  # the same command: complete, exit 0
    assert code == 0 and "this run is complete" in text and md5s(target) == before


def test_another_train_list_or_model_into_a_run_is_refused_naming_the_flag(nih, finished, tmp_path, caplog):
    root, lists = nih
    target = tmp_path / "run"
    shutil.copytree(finished, target)
    (target / "results.json").unlink()  # an interrupted run: its checkpoints, no result yet
    before = md5s(target)
    shorter = edited_list(lists["train"], tmp_path, "train_short.txt", lambda ls: ls[:-1])
    code, text = run_finetune(finetune_flags(lists, root, target, train_list=shorter), caplog)
    assert code == 1 and "--train_list: " in text and "train_short.txt" in text, text
    same_name = tmp_path / "same" / os.path.basename(lists["train"])  # the same name, other content: another run
    same_name.parent.mkdir()
    shutil.copyfile(shorter, same_name)
    code, text = run_finetune(finetune_flags({**lists, "train": str(same_name)}, root, target), caplog)
    assert code == 1 and "--train_list: " in text, text
    code, text = run_finetune(finetune_flags(lists, root, target, model="resnet18", drop_path=0), caplog)
    assert code == 1 and "--model: 'vit_debug_patch16' there, 'resnet18' now" in text, text
    assert len(text) < 4000 and md5s(target) == before  # no page of load_state_dict text


def test_eval_of_a_pretraining_checkpoint_names_the_flag_that_takes_it(nih, tmp_path, caplog):
    root, lists = nih
    model = torch.nn.Linear(2, 2)
    torch.save({"model": model.state_dict(), "epoch": 3, "args": {"model": "mae_vit_debug_patch16"}},
               tmp_path / "pretrain.pth")
    code, text = run_finetune(finetune_flags(lists, root, tmp_path / "eval", eval=True,
                                             resume=tmp_path / "pretrain.pth"), caplog)
    assert code == 1 and "to start from its weights, pass it as --finetune" in text, text


def test_missing_plots_of_a_complete_run_are_drawn_again_without_scoring(nih, finished, tmp_path, caplog):
    root, lists = nih
    target = tmp_path / "finished"
    shutil.copytree(finished, target)
    kept = {k: v for k, v in md5s(target).items() if not k.startswith("roc/")}
    rocs = sorted(p.name for p in (target / "roc").glob("*.png"))
    shutil.rmtree(target / "roc")  # a kill after results.json, before the ROC curves (an older version's order)
    code, text = run_finetune(finetune_flags(lists, root, target), caplog)
    assert code == 0 and "roc/*.png were missing: drawn again from test_predictions.csv" in text, text
    assert "scoring the test list" not in text
    assert sorted(p.name for p in (target / "roc").glob("*.png")) == rocs and rocs
    assert {k: v for k, v in md5s(target).items() if not k.startswith("roc/") and k != "val_auroc.png"} == {
        k: v for k, v in kept.items() if k != "val_auroc.png"}


# ---- the tools ----------------------------------------------------------------------------------------------------

def test_export_never_writes_over_its_input_or_an_earlier_export(runs, tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    shutil.copyfile(runs["vit"], run / "pre.pth")
    before = md5s(run)
    proc = run_tool_in_process("export_encoder.py", "--checkpoint", str(run / "pre.pth"), "--out", str(run / "pre"))
    assert proc.returncode == 1 and "is also the input" in proc.stderr and md5s(run) == before, proc.stderr
    assert "Traceback" not in proc.stderr
    assert run_tool_in_process("export_encoder.py", "--checkpoint", str(run / "pre.pth"),
                               "--out", str(run / "enc")).returncode == 0
    before = md5s(run)
    again = run_tool_in_process("export_encoder.py", "--checkpoint", str(run / "pre.pth"), "--out", str(run / "enc"))
    assert again.returncode == 1 and "already exist" in again.stderr and "--overwrite" in again.stderr
    assert md5s(run) == before
    forced = run_tool_in_process("export_encoder.py", "--checkpoint", str(run / "pre.pth"), "--out",
                                 str(run / "enc"), "--overwrite")
    assert forced.returncode == 0, forced.stderr


TOOL_CASES = [
    ("export, --input_size not a multiple of the patch",
     lambda t, runs: ("export_encoder.py", "--checkpoint", runs["vit"], "--out", str(t / "e"), "--input_size", "30"),
     r"--input_size 30: the encoder's patches are 16 pixels; give a multiple of 16"),
    ("export, a missing checkpoint",
     lambda t, runs: ("export_encoder.py", "--checkpoint", str(t / "none.pth"), "--out", str(t / "e")),
     r"checkpoint not found: \S+none.pth"),
    ("export, a fine-tuning checkpoint",
     lambda t, runs: ("export_encoder.py", "--checkpoint", str(t / "finetuned.pth"), "--out", str(t / "e")),
     r"finetuned.pth is a finetune checkpoint \(a classifier\); this tool takes a pre-training checkpoint .* "
     r"\(tools.export_classifier exports a fine-tuned classifier\)"),
    ("prepare_data, --prepare_size 0",
     lambda t, runs: ("prepare_data.py", "--out", str(t / "p"), "--prepare_size", "0"),
     r"--prepare_size 0: the shorter side in pixels, at least 16"),
    ("compute_norm_stats, --max_images 0",
     lambda t, runs: ("compute_norm_stats.py", "--out", str(t / "s.json"), "--max_images", "0"),
     r"--max_images must be >= 1, got 0"),
    ("compute_norm_stats, --out in a missing folder",
     lambda t, runs: ("compute_norm_stats.py", "--out", str(t / "no" / "s.json")), r"the folder \S+/no does not exist"),
    ("compute_norm_stats, --bad_files skip",
     lambda t, runs: ("compute_norm_stats.py", "--out", str(t / "s.json"), "--bad_files", "skip"),
     r"--bad_files skip: the statistics must come from images that decode"),
    ("prepare_data into another preparation's folder",
     lambda t, runs: ("prepare_data.py", "--data_path", str(t / "data"), "--datasets_names", "chestxray_nih",
                      "--train_list", str(t / "data" / "nih_chestxray" / "train_official_subset.txt"),
                      "--out", str(t / "other_preparation"), "--workers", "1"),
     r"\S+other_preparation holds a preparation of other inputs or another --prepare_size; choose an empty folder"),
    ("export, a checkpoint of a model no script builds",
     lambda t, runs: ("export_encoder.py", "--checkpoint", str(t / "unknown_model.pth"), "--out", str(t / "e")),
     r"unknown_model.pth records the model 'mae_vit_small' in its args, which no pre-training script here builds"),
    ("prepare_data, --verify where nothing was prepared",
     lambda t, runs: ("prepare_data.py", "--out", str(t / "none"), "--verify"),
     r"--out \S+none holds no preparation \(no manifest.json\) to verify"),
    ("visualize, an encoder export",
     lambda t, runs: ("visualize_reconstruction.py", "--checkpoint", str(t / "encoder.pth"), "--images", "x.png",
                      "--out", str(t / "v")), r"is not a pre-training checkpoint"),
    ("visualize, a missing --images file",
     lambda t, runs: ("visualize_reconstruction.py", "--checkpoint", runs["vit"], "--images", str(t / "x.png"),
                      "--out", str(t / "v")), r"--images: \S+x.png not found"),
    ("visualize, --out is a file",
     lambda t, runs: ("visualize_reconstruction.py", "--checkpoint", runs["vit"], "--images", str(t / "x.png"),
                      "--out", str(t / "encoder.pth")), r"--out \S+encoder.pth is a file; give a folder"),
]


@pytest.mark.parametrize("case, argv, message", TOOL_CASES, ids=[c[0] for c in TOOL_CASES])
def test_tool_mistakes_are_one_line_naming_the_flag(runs, tmp_path, case, argv, message):
    torch.save({"model": {"w": torch.ones(1)}, "epoch": 0, "task": "finetune", "args": {}}, tmp_path / "finetuned.pth")
    torch.save({"pos_embed": torch.zeros(1, 5, 8)}, tmp_path / "encoder.pth")
    torch.save({"model": {"decoder_embed.weight": torch.zeros(1)}, "args": {"model": "mae_vit_small"}},
               tmp_path / "unknown_model.pth")
    make_nih(str(tmp_path / "data" / "nih_chestxray"), n_patients=4, size=(32, 32))
    (tmp_path / "other_preparation").mkdir()
    (tmp_path / "other_preparation" / "inputs.sha256").write_text("0" * 64)
    before = md5s(tmp_path)
    proc = run_tool_in_process(*argv(tmp_path, runs))
    assert proc.returncode != 0 and re.search(message, proc.stderr + proc.stdout), proc.stderr
    assert "Traceback" not in proc.stderr and md5s(tmp_path) == before


@pytest.mark.parametrize("role, damage", [("test", "truncated"), ("val", "empty")])
def test_an_undecodable_image_of_any_split_fails_at_start_up(nih, tmp_path, caplog, role, damage):
    root, lists = nih
    copy = tmp_path / "nih"
    shutil.copytree(root, copy)
    name = open(lists[role]).read().split()[0]
    image = next(copy.rglob(name))
    image.write_bytes(image.read_bytes()[: image.stat().st_size // 3] if damage == "truncated" else b"")
    code, text = run_finetune(finetune_flags(lists, str(copy), tmp_path / "out"), caplog)
    assert code == 1 and f"of the {role} list" in text and name in text and "do not decode" in text, text
    assert "Epoch: [0]" not in text


def test_eval_with_other_transforms_than_its_run_is_refused(nih, finished, tmp_path, caplog):
    root, lists = nih
    code, text = run_finetune(finetune_flags(lists, root, tmp_path / "eval", eval=True, build_timm_transform=True,
                                             resume=finished / "checkpoint-best.pth"), caplog)
    assert code == 1 and "--build_timm_transform False in its run, True now" in text, text
    assert not (tmp_path / "eval" / "results.json").exists()
    code, text = run_finetune(finetune_flags(lists, root, tmp_path / "eval", eval=True,
                                             resume=finished / "checkpoint-best.pth"), caplog)
    assert code == 0 and (tmp_path / "eval" / "results.json").is_file(), text


@pytest.mark.slow
def test_verify_data_checks_a_fine_tuning_datasets_three_lists(nih, tmp_path):
    """What the start-up message suggests for a bad image of a fine-tuning list: verify_data --dataset finds it,
    and every other bad file, without training."""
    root, lists = nih
    copy = tmp_path / "nih"
    shutil.copytree(root, copy)
    name = open(lists["test"]).read().split()[0]
    image = next(copy.rglob(name))
    image.write_bytes(image.read_bytes()[:100])
    proc = run_tool_in_process("verify_data.py", "--dataset", "chestxray", "--data_path", str(copy), "--train_list",
                               lists["train"], "--val_list", lists["val"], "--test_list", lists["test"],
                               "--workers", "1")
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert f"BAD {image}" in proc.stdout and "FAILED: 1 bad file(s) in 1 of 3 list(s)" in proc.stdout, proc.stdout


def test_a_chexpert_valid_csv_without_a_finding_fails_at_start_up(tmp_path, caplog):
    """The test set's labels are read at start-up: a valid.csv missing a finding's column is named before training."""
    import pandas as pd

    from data.synthetic import make_chexpert
    make_chexpert(str(tmp_path), n_patients=12, size=(32, 32))
    valid = tmp_path / "CheXpert-v1.0-small" / "valid.csv"
    pd.read_csv(valid).drop(columns=["Edema"]).to_csv(valid, index=False)
    out = tmp_path / "out"
    flags = argv({**FLAGS, "dataset": "chexpert", "nb_classes": 5, "output_dir": out, "log_dir": out,
                  "data_path": tmp_path / "CheXpert-v1.0-small"})
    code, text = run_finetune(flags, caplog)
    assert code == 1 and re.search(r"\S+valid.csv lacks the column\(s\) \['Edema'\]", text), text
    assert "Epoch: [0]" not in text and not (out / "checkpoint-last.pth").exists()
