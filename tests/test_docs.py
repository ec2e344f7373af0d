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
import textwrap

import pytest
from PIL import Image

import main_pretrain_multi_datasets_xray as vit_main
import main_pretrain_multi_datasets_xray_cnn as cnn_main
import main_segment_chestxray as seg_main
from data.synthetic import make_chexpert, make_mimic, make_nih
from tests.helpers import ROOT, TOOLS, child_env

REFERENCE_DOC = ROOT.parent / "shared" / "reference" / "PRETRAIN.reference.md"
COPY = ROOT / "tests" / "reference_commands.md"  # the commands alone, so the contract holds without shared/


def code_blocks(markdown: str) -> list[str]:
    """Every fenced block, also one indented inside a list item (its lines dedented)."""
    return [textwrap.dedent(body) for _, body in re.findall(r"^([ \t]*)```[a-z0-9_]*\n(.*?)^\1```", markdown,
                                                             re.S | re.M)]


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


# ---- every flag documented -------------------------------------------------------------------------------------

def _section(doc: str, title: str) -> str:
    text = (ROOT / doc).read_text(encoding="utf-8")
    start = text.index(title)
    end = text.find("\n## ", start + 1)
    return text[start:end if end > 0 else None]


def _flags(parser: argparse.ArgumentParser) -> dict[str, object]:
    """--flag -> default, for every flag --help shows (the underscore spelling where there are two)."""
    out = {}
    for action in parser._actions:
        if action.help == argparse.SUPPRESS or not action.option_strings or "--help" in action.option_strings:
            continue
        out[sorted(action.option_strings, key=lambda o: ("_" not in o, -len(o)))[0]] = action.default
    return out


def test_every_flag_of_every_entry_script_is_documented():
    """Pre-training flags in PRETRAIN.md section 8; fine-tuning and probe flags in FINETUNE.md section 7, segmentation
    flags in its section 11, or, for the flags the engine shares, in PRETRAIN.md section 8 with the same default."""
    import main_finetune_chestxray as ft_main

    pretrain_doc = _section("PRETRAIN.md", "## 8. Every flag")
    finetune_doc = _section("FINETUNE.md", "## 7. Every flag")
    pretrain = {**_flags(vit_main.get_args_parser()), **_flags(cnn_main.get_args_parser())}
    missing = [f for f in pretrain if f"`{f}" not in pretrain_doc]
    for linear_probe in (False, True):
        for flag, default in _flags(ft_main.get_args_parser(linear_probe)).items():
            shared = flag in pretrain and pretrain[flag] == default and f"`{flag}" in pretrain_doc
            if f"`{flag}" not in finetune_doc and not shared:
                missing.append(f"{flag} ({'probe' if linear_probe else 'fine-tuning'})")
    segment_doc = _section("FINETUNE.md", "## 11. Segmentation")
    for flag, default in _flags(seg_main.get_args_parser()).items():
        shared = flag in pretrain and pretrain[flag] == default and f"`{flag}" in pretrain_doc
        if f"`{flag}" not in segment_doc and not shared:
            missing.append(f"{flag} (segmentation)")
    assert not missing, f"flags with no row in the docs: {sorted(set(missing))}"


@pytest.mark.parametrize("tool", TOOLS)
def test_every_flag_of_every_tool_is_documented(tool):
    """Each flag a tool's --help lists is in its row of a tools table (PRETRAIN.md's, or FINETUNE.md's for the
    evaluation tools), or in PRETRAIN.md section 1's data flags. Every module in tools/ is a tool with a row."""
    from tests.helpers import run_tool_in_process

    proc = run_tool_in_process(f"{tool}.py", "--help")
    assert proc.returncode == 0, proc.stderr
    usage = proc.stdout.split("\n\n", 1)[0]  # the usage lines list every option; the description may name others
    shown = set(re.findall(r"(--[a-z][a-z0-9_]*)", usage)) - {"--help"}
    doc = "\n".join((ROOT / name).read_text(encoding="utf-8") for name in ("PRETRAIN.md", "FINETUNE.md"))
    data_section = _section("PRETRAIN.md", "## 1. Data") + _section("PRETRAIN.md", "## 8. Every flag")
    row = next((line for line in doc.splitlines() if line.startswith(f"| `python -m tools.{tool}`")), None)
    assert row is not None, f"tools.{tool} has no row in the tools tables of PRETRAIN.md or FINETUNE.md"
    missing = sorted(f for f in shown if f"`{f}" not in row and f"`{f}" not in data_section)
    assert not missing, f"tools.{tool}: {missing} not in PRETRAIN.md"


# ---- every documented command parses ---------------------------------------------------------------------------

DOCS = ("README.md", "PRETRAIN.md", "FINETUNE.md", "benchmarks/RESULTS.md")


def documented_commands() -> list[tuple[str, str]]:
    """(document, command) for every python/torchrun/make command in a code block or an inline code span."""
    found = []
    for doc in DOCS:
        text = (ROOT / doc).read_text(encoding="utf-8")
        lines = [line for block in code_blocks(text) for line in re.sub(r"\\\n\s*", " ", block).splitlines()]
        spans = re.findall(r"`((?:python|torchrun|make) [^`]+)`", text)  # prose: those that name what they run
        lines += [s for s in spans if re.search(r"main_\w+\.py|-m (tools|benchmarks|pytest)\b|^make \w", s)
                  and "<" not in s]
        for line in lines:
            command = line.split(" #", 1)[0].strip()
            if re.search(r"(^|\s)(python3?|torchrun|make) ", command + " ") and not command.startswith("#"):
                found.append((doc, command))
    return found


def _script_flags(tokens: list[str]) -> tuple[str, list[str]] | None:
    for i, token in enumerate(tokens):
        if token.endswith(".py") and token.startswith("main_"):
            return token, [t for t in tokens[i + 1:] if t != "..."]
    return None


@pytest.mark.parametrize("doc, command", documented_commands(), ids=lambda v: v[:60] if isinstance(v, str) else v)
def test_every_documented_command_parses_and_passes_the_flag_checks(doc, command):
    """Each command as a user copies it: an entry script's flags parse and pass every flag check, a tool or benchmark
    is run as a module that takes the flags shown, a make target exists. (Running them needs the real datasets and
    GPUs; the reference commands and the demos are run for real by other tests.)"""
    import engine_finetune
    import engine_pretrain
    import main_finetune_chestxray as ft_main
    from engine_segment import SegmentationTask
    from tests.helpers import run_tool_in_process
    from util.args import validate_args

    command = re.sub(r"\$\{?(\w+)\}?", lambda m: f"/{m.group(1).lower()}", command)
    tokens = shlex.split(command)
    if tokens[0] == "make":
        targets = re.findall(r"^([a-z][a-z-]*):", (ROOT / "Makefile").read_text(), re.M)
        assert tokens[1] in targets, f"{doc}: make {tokens[1]} is no Makefile target"
        return
    script = _script_flags(tokens)
    if script is not None:
        name, flags = script
        linear_probe = name == "main_linprobe_chestxray.py"
        parser, task = {
            "main_pretrain_multi_datasets_xray.py": (vit_main.get_args_parser(), engine_pretrain.PretrainTask(
                vit_main.build_model, vit_main.check_model_args)),
            "main_pretrain_multi_datasets_xray_cnn.py": (cnn_main.get_args_parser(), engine_pretrain.PretrainTask(
                cnn_main.build_model, cnn_main.check_model_args)),
            "main_segment_chestxray.py": (seg_main.get_args_parser(), SegmentationTask(
                seg_main.build_segmenter, seg_main.check_model_args)),
        }.get(name) or (ft_main.get_args_parser(linear_probe), engine_finetune.ClassificationTask(
            ft_main.build_classifier, "linprobe" if linear_probe else "finetune", ft_main.check_model_args))
        args = argparse.ArgumentParser(parents=[parser]).parse_args(flags)
        validate_args(args, task.check_args(args))
        return
    module = next((t for t in tokens[tokens.index("-m") + 1:tokens.index("-m") + 2]), None) if "-m" in tokens else None
    if module == "pytest":
        missing = [t for t in tokens if t.startswith("tests/") and not (ROOT / t.split("::")[0]).exists()]
        assert not missing, f"{doc}: `{command}` names {missing}"
        return
    assert module is not None and module.startswith(("tools.", "benchmarks.")), \
        f"{doc}: `{command}` runs no entry script and no module (tools and benchmarks run as python -m ...)"
    path = ROOT / (module.replace(".", "/") + ".py")
    assert path.is_file(), f"{doc}: {module} does not exist"
    if "--" in tokens:  # tools.sweep: what follows -- is the fine-tuning script's, checked with its parser
        passed = tokens[tokens.index("--") + 1:]
        args = argparse.ArgumentParser(parents=[ft_main.get_args_parser()]).parse_args(passed)
        validate_args(args, engine_finetune.check_args(args))
        tokens = tokens[:tokens.index("--")]
    given = [t.split("=")[0] for t in tokens if t.startswith("--")]
    if module.startswith("tools."):
        shown = run_tool_in_process(f"{module.split('.')[1]}.py", "--help").stdout
    else:
        shown = path.read_text(encoding="utf-8")
    missing = [flag for flag in given if flag not in shown]
    assert not missing, f"{doc}: `{command}`: {module} has no {missing}"


def _documented_defaults(doc: str, title: str) -> dict[str, str]:
    """--flag -> its default cell, for the rows of a flag table that document one flag."""
    out = {}
    for line in _section(doc, title).splitlines():
        cells = [cell.strip() for cell in line.strip().strip("|").split("|")]
        names = re.findall(r"`(--[\w-]+)`", cells[0]) if line.startswith("| `--") else []
        if len(names) == 1 and len(cells) >= 2:
            out[names[0]] = cells[1]
    return out


def _agrees(default, cell: str) -> bool:
    """Whether a table's default cell states the parser's default. None means derived: the cell says how."""
    text = cell.replace("`", "").strip()
    if default is None:
        return True
    if isinstance(default, bool):
        return text.split()[0] in (("on",) if default else ("off",))
    if isinstance(default, (int, float)):
        number = re.match(r"-?[\d.]+(e-?\d+)?", text)
        return number is not None and float(number.group()) == float(default)
    if isinstance(default, list):
        return " ".join(map(str, default)) in text
    return str(default) in text


def test_the_documented_defaults_are_the_parsers():
    import main_finetune_chestxray as ft_main

    wrong = []
    for doc, title, parsers in (
            ("PRETRAIN.md", "## 8. Every flag", [vit_main.get_args_parser(), cnn_main.get_args_parser()]),
            ("FINETUNE.md", "## 7. Every flag", [ft_main.get_args_parser()]),
            ("FINETUNE.md", "## 11. Segmentation", [seg_main.get_args_parser()])):
        cells = _documented_defaults(doc, title)
        for parser in parsers:
            for action in parser._actions:
                for name in action.option_strings:
                    if name in cells and not _agrees(action.default, cells[name]):
                        wrong.append(f"{doc} {name}: '{cells[name]}', the parser's default is {action.default!r}")
    assert not wrong, "\n".join(wrong)


# ---- every runnable documented command runs, sizes shrunk ------------------------------------------------------

# A documented command that is not run here, and why. Everything else with an entry script or a tool runs below.
NOT_RUN = {
    r"^make ": "make targets: `make test`/`make gpu-check` are what CI runs; the demos have their own tests",
    r"-m benchmarks\.": "benchmarks take minutes by design; module and flags are checked above, make bench runs them",
    r"-m pytest": "a test file of this suite",
    r"^srun ": "SLURM launch: tests/test_slurm.py runs the sbatch scripts on a local SLURM",
    r"^torchrun --nproc_per_node=8 main_finetune_chestxray\.py \.\.\.$": "a sketch; the full fine-tuning commands run",
    r"\(--images FILES \| --datasets_names \.\.\.\)": "a synopsis with alternatives; tests/test_cli.py runs the tool",
    r"^python -m tools\.\w+( \.\.\.)?$": "the tool named in prose; its flags are in the tables",
    r"-m tools\.(compare_runs|collect_results) ": "needs finished runs; tests/tools/ runs it on run folders",
    r"-m tools\.sweep ": "a sweep of 18 full fine-tuning runs; tests/tools/test_sweep_and_collect.py runs a small one",
    r"data/prepared_320": "each would first prepare the fixture's every NIH image (86,524 hard links); "
                          "tests/data/test_prepared.py and tests/tools/test_find_duplicates.py run tools.prepare_data, "
                          "--prepared_dir and --pool_prepared on small pools",
}
REFERENCE_RUN_ELSEWHERE = "a reference command: run by test_reference_command_runs_with_sizes_shrunk"
SMALLER = [(r"--nproc_per_node=\d+", "--nproc_per_node=1"), (r"--batch_size \d+", "--batch_size 2"),
           (r"--epochs \d+", "--epochs 1"), (r"--num_workers \d+", "--num_workers 0"),
           (r"--workers \d+", "--workers 2"), (r"--input_size \d+", "--input_size 64"), (r"\s\.\.\.(\s|$)", " ")]


def _normal(command: str) -> str:
    return " ".join(shlex.split(re.sub(r"\\\n", " ", command)))


def _why_not_run(command: str) -> str | None:
    import tests.test_finetune as ft_tests
    reference = {_normal(c) for c in [*REFERENCE_COMMANDS.values(), *ft_tests.REFERENCE_COMMANDS.values()]}
    if _normal(command) in reference:
        return REFERENCE_RUN_ELSEWHERE
    return next((why for pattern, why in NOT_RUN.items() if re.search(pattern, command)), None)


RUN = [(doc, c) for doc, c in documented_commands() if _why_not_run(c) is None]


def test_every_documented_command_is_run_or_says_why_not():
    """The list of commands run below is everything documented less the reasons above: a new command runs by default."""
    tools = [c for _, c in RUN if "-m tools." in c]
    scripts = [c for _, c in RUN if re.search(r"main_\w+\.py", c)]
    assert len(tools) + len(scripts) == len(RUN), [c for _, c in RUN if c not in tools + scripts]
    assert len(scripts) >= 7 and len(tools) >= 2, RUN


@pytest.fixture(scope="module")
def docs_data(reference_cwd):
    """What the documented commands name beside the reference layout: NIH labelled lists in data/nih_chestxray,
    COVIDx in data/covidx, NODE21 in data/node21, SIIM-ACR in data/siim, lung masks in data/lungs, the CSV task's
    my_data/, a ViT-S pre-training checkpoint at runs/vit_s/checkpoint-799.pth (written as the reference's: the MAE
    state dict and the args as a Namespace) and a DenseNet-121 U-Net's at runs/unet_dn121/checkpoint-799.pth."""
    import torch

    import models_mae
    import models_mae_cnn
    from data.synthetic import (
        make_covidx,
        make_csv_dataset,
        make_lung_masks,
        make_nih_labelled,
        make_node21,
        make_siim,
    )
    lists = make_nih_labelled(str(reference_cwd / "data" / "nih_chestxray"), patients=(4, 2, 2), size=(32, 32))
    entry = reference_cwd / "data" / "nih_chestxray" / "Data_Entry_2017_v2020.csv"  # their rows, for tools.subgroups
    with open(entry, "a", encoding="utf-8") as f:
        for k, line in enumerate(open(lists["test"]).read().splitlines()):
            name = line.split()[0]
            f.write(f"{name},No Finding,0,{int(name[:8])},{30 + 20 * k},{'MF'[k % 2]},{'PA' if k % 3 else 'AP'},"
                    "2500,2048,0.168,0.168\n")
    make_covidx(str(reference_cwd / "data" / "covidx"), train=24, test=12, size=(32, 32))
    make_node21(str(reference_cwd / "data" / "node21"), images=20, size=(32, 32))
    # one COVIDx test image is an NIH image saved again (as RSNA's are), for tools.find_duplicates to find
    nih_image = sorted((reference_cwd / "data" / "nih_chestxray" / "images").iterdir())[0]
    covidx_test = sorted((reference_cwd / "data" / "covidx" / "test").iterdir())[0]
    covidx_test.unlink()
    Image.open(nih_image).convert("L").save(covidx_test)
    make_csv_dataset(str(reference_cwd / "my_data"), patients=(4, 2, 2))
    make_siim(str(reference_cwd / "data" / "siim"), images=24, size=(64, 64))
    make_lung_masks(str(reference_cwd / "data" / "lungs"), images=24, size=(64, 64))
    unet = models_mae_cnn.create_model("densenet121", img_size=224)  # as the U-Net pre-training writes its args
    torch.save({"model": unet.state_dict(), "epoch": 799, "args": {"model": "densenet121", "model_arch": "Unet"}},
               reference_cwd / "unet-checkpoint-799.pth")
    checkpoint = reference_cwd / "checkpoint-799.pth"
    mae = models_mae.create_model("mae_vit_small_patch16_dec512d2b")
    saved_args = argparse.Namespace(model="mae_vit_small_patch16_dec512d2b")
    torch.save({"model": mae.state_dict(), "epoch": 799, "args": saved_args}, checkpoint)
    for script in ("main_finetune_chestxray.py", "main_linprobe_chestxray.py", "main_segment_chestxray.py"):
        os.symlink(ROOT / script, reference_cwd / script)
    return {"cwd": reference_cwd, "checkpoint": checkpoint, "nih_lists": lists}


def _runnable(command: str, data: dict) -> str:
    """The command with its sizes shrunk, its placeholders filled, a few steps per epoch and the NIH fine-tuning's
    default (official, 112,120-image) lists swapped for the fixture's labelled ones."""
    for pattern, small in SMALLER:
        command = re.sub(pattern, small, command)
    command = command.replace("CKPT", "runs/vit_s/checkpoint-799.pth")
    command = re.sub(r"(^|\s)python3? ", lambda m: f"{m.group(1)}{shlex.quote(sys.executable)} ", command)
    command = command.replace("torchrun ", f"{shlex.quote(sys.executable)} -m torch.distributed.run ")
    if re.search(r"main_\w+\.py", command):
        command += " --max_steps_per_epoch 2"
        command += "".join(f" --{flag} {value}" for flag, value in (
            ("input_size", 64), ("num_workers", 0), ("epochs", 1), ("batch_size", 2)) if f"--{flag}" not in command)
    if re.search(r"main_(finetune|linprobe|segment)_chestxray\.py", command):
        command += " --bootstrap 20 --print_freq 50"
        if "--dataset" not in command and "--train_list" not in command:
            command += "".join(f" --{role}_list {shlex.quote(path)}" for role, path in data["nih_lists"].items())
    return command


@pytest.mark.slow
@pytest.mark.parametrize("doc, command", RUN, ids=lambda v: v[:70] if isinstance(v, str) else v)
def test_documented_command_runs_with_sizes_shrunk(docs_data, tmp_path, free_port, doc, command):
    """Each runnable command of README, PRETRAIN.md, FINETUNE.md and RESULTS.md, as a user pastes it into a folder
    that has the data it names (sizes shrunk as for the reference commands). A command that needs an export first
    (the CSV task fine-tunes exports/vit_s.pth) runs the documented export before it."""
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    for entry in os.listdir(docs_data["cwd"]):
        if entry not in ("checkpoint-799.pth", "unet-checkpoint-799.pth"):
            os.symlink(docs_data["cwd"] / entry, cwd / entry)
    if any(name in command for name in ("vit_s/checkpoint-799.pth", "CKPT", "exports/vit_s.pth", "runs/ft_vit_s",
                                        "runs/covidx_vit_s")):
        (cwd / "runs" / "vit_s").mkdir(parents=True)
        os.link(docs_data["checkpoint"], cwd / "runs" / "vit_s" / "checkpoint-799.pth")
    if "runs/unet_dn121/" in command:
        (cwd / "runs" / "unet_dn121").mkdir(parents=True)
        os.link(docs_data["cwd"] / "unet-checkpoint-799.pth", cwd / "runs" / "unet_dn121" / "checkpoint-799.pth")
    env = child_env(SAVE_DIR=tmp_path / "save", PET_MASTER_PORT=free_port)
    steps = [command]
    if "exports/vit_s.pth" in command:
        steps.insert(0, next(c for _, c in RUN if "-m tools.export_encoder" in c and "exports/vit_s" in c))
    if "dups/covidx_vs_nih/exclude_list.txt" in command:  # the exclusion list the documented find_duplicates writes
        steps.insert(0, next(c for _, c in RUN if "-m tools.find_duplicates" in c))
    if "-m tools." in command and "runs/ft_vit_s" in command:  # a tool reading the documented NIH run
        steps.insert(0, next(c for _, c in RUN if "main_finetune" in c and "--output_dir runs/ft_vit_s " in c))
    if "-m tools." in command and "runs/covidx_vit_s " in command:  # a tool reading the documented COVIDx run
        steps.insert(0, next(c for _, c in RUN if "main_finetune" in c and "--output_dir runs/covidx_vit_s " in c))
    if "--check features/" in command:  # the fingerprint of the documented extraction
        steps.insert(0, next(c for _, c in RUN if "-m tools.extract_features" in c and "--check " not in c))
    for step in steps:
        runnable = _runnable(step, docs_data)
        proc = subprocess.run(["bash", "-c", runnable], cwd=cwd, env=env, capture_output=True, text=True, timeout=600)
        assert proc.returncode == 0, f"{doc}: $ {runnable}\n{proc.stdout[-5000:]}\n{proc.stderr[-5000:]}"
    out = re.search(r"--output_dir (\S+)", command)
    if out is not None and re.search(r"main_(finetune|segment)", command):
        folder = out.group(1).replace("${SAVE_DIR}", str(tmp_path / "save"))
        assert (cwd / folder / "results.json").is_file(), proc.stdout[-3000:]
    elif re.search(r"main_pretrain\w*\.py", command):
        folder = out.group(1).replace("${SAVE_DIR}", str(tmp_path / "save")) if out else "output_dir"
        assert (cwd / folder / "checkpoint-last.pth").is_file() or list((cwd / folder).glob("checkpoint-*.pth")), \
            proc.stdout[-3000:]
