"""Imports go downward only: util -> (data, models) -> engine -> entry scripts; nothing imports tools/ etc."""
import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PROJECT = {"util", "data", "models_mae", "models_mae_cnn", "models_vit", "models_cnn", "models_seg", "engine",
           "engine_pretrain", "engine_finetune", "engine_segment", "main_segment_chestxray",
           "main_pretrain_multi_datasets_xray", "main_pretrain_multi_datasets_xray_cnn",
           "main_finetune_chestxray", "main_linprobe_chestxray", "tools", "scripts", "benchmarks", "tests"}
ALLOWED = {
    "util": {"util"},
    "data": {"data", "util"},
    "models_mae": {"util"},
    "models_mae_cnn": {"util"},
    "models_vit": {"util"},
    "models_cnn": {"util"},
    "models_seg": {"util", "models_mae_cnn", "models_vit"},  # the encoders' names and their weight converters
    # the shared run knows no task and no model; each task builds on it alone (no import between tasks)
    "engine": {"data", "util"},
    "engine_pretrain": {"engine", "data", "util"},
    "engine_finetune": {"engine", "data", "util"},
    "engine_segment": {"engine", "data", "util"},
    "main_pretrain_multi_datasets_xray": {"data", "util", "models_mae", "engine", "engine_pretrain"},
    "main_pretrain_multi_datasets_xray_cnn": {"data", "util", "models_mae_cnn", "engine", "engine_pretrain"},
    "main_finetune_chestxray": {"data", "util", "models_vit", "models_cnn", "engine", "engine_finetune"},
    "main_linprobe_chestxray": {"main_finetune_chestxray"},
    "main_segment_chestxray": {"data", "util", "models_seg", "engine", "engine_segment"},
}


def _project_imports(path: Path) -> set[str]:
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        names = [a.name for a in node.names] if isinstance(node, ast.Import) else (
            [node.module] if isinstance(node, ast.ImportFrom) and node.module and node.level == 0 else [])
        found |= {n.split(".")[0] for n in names if n.split(".")[0] in PROJECT}
    return found


def test_layering():
    violations = []
    for layer, allowed in ALLOWED.items():
        files = sorted((ROOT / layer).rglob("*.py")) if (ROOT / layer).is_dir() else [ROOT / f"{layer}.py"]
        for path in files:
            bad = _project_imports(path) - allowed
            if bad:
                violations.append(f"{path.relative_to(ROOT)} imports {sorted(bad)}")
    assert not violations, "\n".join(violations)
