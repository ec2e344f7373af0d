"""The paper's three commands: shown verbatim in PRETRAIN.md, the same recipes in README and scripts/, and runnable.

tests/reference_commands.md holds the three code blocks of the reference's PRETRAIN.md; when the published document
is beside the checkout (../shared/reference/, as here and on CI) the copy must equal it.
"""
import argparse
import json
import os
import re
import shlex
import subprocess
import sys

import pytest

import main_pretrain_multi_datasets_xray as vit_main
import main_pretrain_multi_datasets_xray_cnn as cnn_main
from data.synthetic import make_chexpert, make_mimic, make_nih
from tests.helpers import ROOT, child_env

REFERENCE_DOC = ROOT.parent / "shared" / "reference" / "PRETRAIN.reference.md"
COPY = ROOT / "tests" / "reference_commands.md"  # the commands alone, so the contract holds without shared/


def code_blocks(markdown: str) -> list[str]:
    return re.findall(r"^```[a-z0-9_]*\n(.*?)^```", markdown, re.S | re.M)


REFERENCE_COMMANDS = dict(re.findall(r"^```([a-z0-9_]+)\n(.*?)^```", COPY.read_text(), re.S | re.M))


def test_reference_copy_is_the_published_document():
    assert sorted(REFERENCE_COMMANDS) == ["densenet121", "vit_b", "vit_s"]
    if not REFERENCE_DOC.is_file():
        assert not os.environ.get("CI"), f"{REFERENCE_DOC} must be beside the checkout on CI"
        pytest.skip(f"{REFERENCE_DOC} is not beside this checkout; tests/reference_commands.md stands in")
    assert sorted(code_blocks(REFERENCE_DOC.read_text())) == sorted(REFERENCE_COMMANDS.values())


def test_pretrain_md_shows_the_three_reference_commands_verbatim():
    ours = code_blocks((ROOT / "PRETRAIN.md").read_text())
    for name, command in REFERENCE_COMMANDS.items():
        assert command in ours, f"PRETRAIN.md lacks the reference {name} command exactly as published:\n{command}"


def _parse(tokens: list[str]) -> tuple[str, argparse.Namespace]:
    """(script name, the flags after it parsed by that script's own parser)."""
    script = next(t for t in tokens if t.endswith(".py"))
    module = cnn_main if script.endswith("_cnn.py") else vit_main
    flags = tokens[tokens.index(script) + 1:]
    return os.path.basename(script), argparse.ArgumentParser(parents=[module.get_args_parser()]).parse_args(flags)


def _reference(name: str):
    return _parse(shlex.split(REFERENCE_COMMANDS[name].replace("\\\n", " ")))


@pytest.mark.parametrize("recipe", list(REFERENCE_COMMANDS))
def test_reference_commands_parse_and_pass_the_checks(recipe):
    script, args = _reference(recipe)
    module = cnn_main if script.endswith("_cnn.py") else vit_main
    assert args.batch_size == 256 and args.epochs == 800 and module.check_model_args(args) == []


# what a launch location may set differently from the recipe itself
WHERE = {"output_dir", "log_dir", "data_path"}


@pytest.mark.parametrize("recipe", list(REFERENCE_COMMANDS))
def test_slurm_recipes_are_the_reference_commands(recipe):
    out = subprocess.run(["bash", "-c", 'source scripts/recipes.sh && printf "%s\\n" "$SCRIPT" "${RECIPE_ARGS[@]}"'],
                         cwd=ROOT, env={**os.environ, "RECIPE": recipe}, capture_output=True, text=True, check=True)
    script, ours = _parse(out.stdout.splitlines())
    ref_script, ref = _reference(recipe)
    assert script == ref_script
    assert ours.device == "cuda"  # the batch scripts never fall back to the CPU silently
    differ = {k for k in vars(ref) if getattr(ours, k) != getattr(ref, k)} - WHERE - {"device"}
    assert not differ, {k: (getattr(ours, k), getattr(ref, k)) for k in differ}


def test_readme_short_version_is_the_reference_vit_s_recipe():
    readme = (ROOT / "README.md").read_text()
    command = next(b for b in code_blocks(readme) if "torchrun" in b)
    script, ours = _parse(shlex.split(command.replace("\\\n", " ")))
    ref_script, ref = _reference("vit_s")
    assert script == ref_script
    differ = {k for k in vars(ref) if getattr(ours, k) != getattr(ref, k)} - WHERE - {"num_workers"}
    assert not differ, {k: (getattr(ours, k), getattr(ref, k)) for k in differ}


# ---- the commands run: only sizes shrunk, on fixtures in the reference layout with NIH's full official list ----

SHRUNK = {"--nproc_per_node=8": "--nproc_per_node=2", "--batch_size 256": "--batch_size 2",
          "--epochs 800": "--epochs 1", "--num_workers 8": "--num_workers 1", "--input_size 224": "--input_size 64"}


@pytest.fixture(scope="module")
def reference_cwd(tmp_path_factory):
    """A working directory laid out as the reference expects: the scripts, and data/ with CheXpert-small, NIH with
    every image of train_official.txt (hard links), and MIMIC-CXR-JPG."""
    cwd = tmp_path_factory.mktemp("reference_cwd")
    make_chexpert(str(cwd / "data"), n_patients=6)
    make_nih(str(cwd / "data" / "nih_chestxray"), full_official=True)
    make_mimic(str(cwd / "data" / "mimic_cxr"), n_subjects=5)
    for script in ("main_pretrain_multi_datasets_xray.py", "main_pretrain_multi_datasets_xray_cnn.py"):
        os.symlink(ROOT / script, cwd / script)  # python puts the resolved script folder on sys.path
    return cwd


@pytest.mark.slow
@pytest.mark.parametrize("recipe", list(REFERENCE_COMMANDS))
def test_reference_command_runs_with_sizes_shrunk(reference_cwd, tmp_path, free_port, recipe):
    command = REFERENCE_COMMANDS[recipe]
    for full, small in SHRUNK.items():
        assert full in command
        command = command.replace(full, small)
    command = command.replace("python -m", f"{shlex.quote(sys.executable)} -m").rstrip("\n")
    command += " \\\n --max_steps_per_epoch 2"
    save_dir = tmp_path / "save"
    # the launcher reads its --master_port from PET_MASTER_PORT, so the command text stays as published
    proc = subprocess.run(["bash", "-c", command], cwd=reference_cwd,
                          env=child_env(SAVE_DIR=save_dir, PET_MASTER_PORT=free_port), capture_output=True, text=True,
                          timeout=600)
    output = f"$ {command}\n{proc.stdout[-6000:]}\n{proc.stderr[-6000:]}"
    assert proc.returncode == 0, output
    assert proc.stdout.count("--warmup_epochs 40 is more than --epochs 1") == 1, output  # one warning, all ranks
    resolved = json.loads(re.search(r"resolved run: (\{.*\})", proc.stdout).group(1))
    assert resolved["world_size"] == 2 and resolved["eff_batch_size"] == 4, output
    assert "chestxray_nih: 75312 images" in proc.stdout and "train_official.txt: 75312" in proc.stdout, output
    assert ("mimic_cxr: " in proc.stdout) == ("mimic_cxr" in REFERENCE_COMMANDS[recipe])
    assert (save_dir / "checkpoint-0.pth").is_file() and (save_dir / "log.txt").is_file(), output
