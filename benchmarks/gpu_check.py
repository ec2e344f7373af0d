"""make gpu-check: prove the CUDA paths on one GPU, then measure the training step's throughput.

    python -m benchmarks.gpu_check [--out gpu_check] [--smoke] [--skip_tests] [--skip_throughput]

1. The CUDA-marked tests (pytest -m gpu, tests/test_gpu.py): bf16 and fp16 steps of the ViT and the U-Net, an fp16
   overflow on the device, --gpu_augment against CPU, the CUDA RNG round trip, channels_last, pinned batches, NCCL at
   world size 1, SIGTERM then resume, kill -9 then resume with identical weights under --deterministic.
2. Throughput at batch 256 for ViT-S dec512d2b and ViT-B dec512d8b (mask 0.9) and the DenseNet-121 U-Net (mask
   0.75), 224 px, of the engine's real step (benchmarks/engine_step.py):
   - model only: the batch already on the device; bf16 and fp16, eager and torch.compile;
   - end to end: the entry script training from a --prepared_dir with 8 workers and pinned memory, with and without
     --gpu_augment (bf16, eager).
   Each row: images/s, the share of step time spent waiting for data, peak memory, and model FLOP utilisation (MFU:
   counted forward + backward FLOPs per second over the card's dense bf16 peak).

Writes OUT/gpu_check.json and OUT/gpu_check.md, and exits non-zero if a test or a measurement failed. Without CUDA
(or with --smoke) the same script runs everything at toy sizes on CPU in a few minutes, so CI keeps it working; the
smoke numbers mean nothing.
"""
import argparse
import json
import multiprocessing
import os
import platform
import signal
import subprocess
import sys
import time
import xml.etree.ElementTree as ET
from pathlib import Path

import torch

from util.cuda_env import cuda_diagnosis, gpu_signs

ROOT = Path(__file__).resolve().parents[1]

# Dense (no sparsity) bf16 tensor-core peak from NVIDIA's data sheets, in FLOP/s, by the exact name
# torch.cuda.get_device_name reports: a substring match would give an H200 NVL the SXM part's peak, or an L40 the L4's.
# A card not listed gets no MFU ("unknown"), never a neighbour's number.
DENSE_BF16_PEAK = {
    "NVIDIA H100 80GB HBM3": 989e12, "NVIDIA H100 PCIe": 756e12, "NVIDIA H100 NVL": 835e12,
    "NVIDIA H200": 989e12, "NVIDIA H200 NVL": 835e12, "NVIDIA GH200 480GB": 989e12,
    "NVIDIA A100-SXM4-80GB": 312e12, "NVIDIA A100-SXM4-40GB": 312e12, "NVIDIA A100 80GB PCIe": 312e12,
    "NVIDIA A100-PCIE-40GB": 312e12, "NVIDIA L40S": 362e12, "NVIDIA L4": 121e12, "NVIDIA A10G": 70e12,
}

# name: (entry script kind, --model, --mask_ratio)
FULL_MODELS = {"vit_s_dec512d2b": ("vit", "mae_vit_small_patch16_dec512d2b", 0.9),
               "vit_b_dec512d8b": ("vit", "mae_vit_base_patch16_dec512d8b", 0.9),
               "unet_densenet121": ("cnn", "densenet121", 0.75)}
SMOKE_MODELS = {"vit_debug": ("vit", "mae_vit_debug_patch16", 0.75), "unet_resnet18": ("cnn", "resnet18", 0.75)}


def peak_flops(device: torch.device) -> tuple[str, float | None]:
    if device.type != "cuda":
        return platform.processor() or "cpu", None
    name = torch.cuda.get_device_name(device)
    return name, peak_for(name)


def peak_for(name: str) -> float | None:
    """The card's dense bf16 peak by its exact name, or None (MFU not computed)."""
    return DENSE_BF16_PEAK.get(name.strip())


def plan(smoke: bool) -> dict:
    """What to measure, most important first: the full matrix on a GPU, toy sizes for the CPU smoke mode (the same
    rows in the same order). model_only lists (model, precision, compiled): the compiled ViT-S bf16 row first (the
    one configuration a paper run uses), then the eager ones. Each kind of row has a time limit in seconds: a row
    that runs past it is stopped and reported as timed out, and a row whose limit no longer fits the budget is not
    started."""
    # fp16 convolutions are very slow on CPU: the U-Net smoke row is bf16 only; inductor takes about 40 s on CPU for
    # a toy model, so the smoke mode's compiled row is the debug ViT, as cheap as a compiled row gets
    if smoke:
        return {"models": SMOKE_MODELS, "batch": 4, "input_size": 64, "steps": 3, "workers": 1,
                "model_only": [("vit_debug", "fp32", True), ("vit_debug", "fp16", False),
                               ("unet_resnet18", "bf16", False)],
                "end_to_end": ["vit_debug"], "e2e_precision": "fp32", "data_scale": 1, "image_size": 96,
                "prepare_size": 80, "canvas": 96, "finetune": True,
                "limits": {"tests": 300, "compiled": 120, "eager": 60, "end_to_end": 90, "finetune": 90}}
    eager = [("vit_s_dec512d2b", "bf16", False), ("vit_s_dec512d2b", "fp16", False),
             ("vit_b_dec512d8b", "bf16", False), ("unet_densenet121", "bf16", False)]
    return {"models": FULL_MODELS, "batch": 256, "input_size": 224, "steps": 20, "workers": 8,
            "model_only": [("vit_s_dec512d2b", "bf16", True), *eager],
            "end_to_end": ["vit_s_dec512d2b", "unet_densenet121"], "e2e_precision": "bf16", "data_scale": 40,
            "image_size": 384, "prepare_size": 320, "canvas": 416, "finetune": True,
            "limits": {"tests": 470, "compiled": 180, "eager": 60, "end_to_end": 90, "finetune": 90}}


def planned_rows(cfg: dict, skip_tests: bool, skip_throughput: bool) -> list[dict]:
    """Every row of this call, in the order it runs, with its time limit."""
    rows = [] if skip_tests else [{"kind": "tests", "what": "pytest -m gpu (tests/test_gpu.py)",
                                   "limit_s": cfg["limits"]["tests"]}]
    if skip_throughput:
        return rows
    for model, precision, compiled in cfg["model_only"]:
        rows.append({"kind": "model_only", "model": model, "precision": precision, "compiled": compiled,
                     "what": f"{model} model only {precision}{' compiled' if compiled else ''}",
                     "limit_s": cfg["limits"]["compiled" if compiled else "eager"]})
    for model in cfg["end_to_end"]:
        for gpu_augment in (False, True):
            rows.append({"kind": "end_to_end", "model": model, "gpu_augment": gpu_augment,
                         "what": f"{model} end to end{', --gpu_augment' if gpu_augment else ', CPU augment'}",
                         "limit_s": cfg["limits"]["end_to_end"]})
    if cfg["finetune"]:
        rows.append({"kind": "finetune", "what": "ViT fine-tuning end to end (main_finetune_chestxray.py)",
                     "limit_s": cfg["limits"]["finetune"]})
    return rows


EXIT_FAILED = 1  # a test failed, or a row failed or ran past its limit
EXIT_INCOMPLETE = 3  # nothing failed, but rows were not started because the budget was spent


def format_plan(rows: list[dict], smoke: bool, budget_minutes: float) -> str:
    """The rows in the order they run, each with its time limit; the sum is the worst case of the call."""
    lines = [f"gpu-check plan ({'smoke' if smoke else 'full'} sizes; budget {budget_minutes:g} min: a row starts only "
             "if its limit fits what is left):"]
    lines += [f"  {k + 1:2d}. {row['what']:<55} at most {row['limit_s']:4d} s" for k, row in enumerate(rows)]
    worst = sum(row["limit_s"] for row in rows)
    lines.append(f"  worst case {worst / 60:.1f} min; the two-call plan for one GPU session: --skip_throughput (the "
                 "tests), then --skip_tests (the throughput)")
    return "\n".join(lines)


def run_limited(cmd: list[str], limit_s: float, env=None) -> tuple[int | None, str]:
    """(exit code, output) of cmd, or (None, output so far) when it ran past limit_s: then its whole process group
    (pytest's or torchrun's children too) is killed, so one hang cannot spend the session."""
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    try:
        output, _ = proc.communicate(timeout=limit_s)
        return proc.returncode, output
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        output, _ = proc.communicate()
        return None, output


def run_tests(device: torch.device, out: Path, limit_s: float) -> list[dict]:
    """pytest -m gpu in a child process; one row per test from its JUnit XML."""
    xml = out / "gpu_tests.xml"
    env = {**os.environ, "GPU_CHECK_DEVICE": device.type, "PYTHONPATH": str(ROOT)}
    cmd = [sys.executable, "-m", "pytest", "-m", "gpu", "-p", "no:cacheprovider", "-q", f"--junitxml={xml}",
           "tests/test_gpu.py"]
    print("$ " + " ".join(cmd), flush=True)
    start = time.time()
    code, output = run_limited(cmd, limit_s, env)
    print(output, flush=True)
    if code is None:
        return [{"name": "pytest -m gpu", "outcome": "timed out", "seconds": time.time() - start,
                 "detail": f"stopped after its {limit_s:g} s limit"}]
    if not xml.exists():
        return [{"name": "pytest -m gpu", "outcome": "failed", "seconds": time.time() - start,
                 "detail": f"pytest exited with {code} and wrote no report"}]
    rows = []
    for case in ET.parse(xml).getroot().iter("testcase"):
        problem = next((c for c in case if c.tag in ("failure", "error", "skipped")), None)
        outcome = "passed" if problem is None else {"failure": "failed", "error": "failed"}.get(problem.tag,
                                                                                               "skipped")
        rows.append({"name": case.get("name"), "outcome": outcome, "seconds": float(case.get("time", 0)),
                     "detail": "" if problem is None else (problem.get("message") or "")[:300]})
    return rows


def _model_only_child(conn, kind, model, device, precision, batch, steps, compiled, input_size, mask_ratio):
    from benchmarks.engine_step import model_only

    try:
        conn.send(model_only(kind, model, device, precision, batch, steps, compiled, input_size, mask_ratio))
    except Exception as e:  # sent to the parent, which records it as this row's failure
        conn.send({"error": f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"})


def measure_model_only(name, spec, device, precision, compiled, cfg, limit_s: float) -> dict:
    """One configuration in a fresh process, so an out-of-memory or compile failure stays in its row."""
    kind, model, mask_ratio = spec
    ctx = multiprocessing.get_context("spawn")
    conn, child_conn = ctx.Pipe()
    start = time.time()
    proc = ctx.Process(target=_model_only_child, args=(child_conn, kind, model, device, precision, cfg["batch"],
                                                       cfg["steps"], compiled, cfg["input_size"], mask_ratio))
    proc.start()
    child_conn.close()
    if not conn.poll(limit_s):
        proc.kill()
        result = {"error": f"timed out: stopped after its {limit_s:g} s limit", "timed_out": True}
    else:
        try:
            result = conn.recv()
        except EOFError:
            result = {"error": f"the measuring process died (exit code {proc.exitcode})"}
    proc.join()
    return {"model": name, "mode": "model only", "precision": precision, "compiled": compiled,
            "wall_s": time.time() - start, "measured_at": time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(start)),
            **result}


def make_prepared_data(work: Path, cfg) -> Path:
    """Generated images in the three reference layouts, prepared once as training reads them at scale."""
    from data.synthetic import make_reference_layout

    data_path, prepared = work / "data", work / f"prepared_{cfg['prepare_size']}"
    if not (prepared / "manifest.json").exists():
        make_reference_layout(str(data_path), scale=cfg["data_scale"], size=(cfg["image_size"], cfg["image_size"]))
        subprocess.run([sys.executable, "-m", "tools.prepare_data", "--data_path", str(data_path),
                        "--datasets_names", "chexpert", "chestxray_nih", "mimic_cxr", "--train_list",
                        str(data_path / "nih_chestxray" / "train_official_subset.txt"), "--out", str(prepared),
                        "--prepare_size", str(cfg["prepare_size"])], cwd=ROOT, check=True)
    return data_path


def measure_end_to_end(name, spec, device, gpu_augment, data_path: Path, work: Path, cfg, limit_s: float) -> dict:
    """The entry script for 2 epochs from --prepared_dir; the second epoch's log.txt line is the measurement."""
    kind, model, mask_ratio = spec
    script = "main_pretrain_multi_datasets_xray.py" if kind == "vit" else "main_pretrain_multi_datasets_xray_cnn.py"
    out = fresh_run_dir(work, f"e2e_{name}_{'gpu_augment' if gpu_augment else 'workers'}")
    subset = data_path / "nih_chestxray" / "train_official_subset.txt"
    weights = [f"{source}=8" for source in ("chexpert", "chestxray_nih", "mimic_cxr")]  # enough steps per epoch
    cmd = [sys.executable, script, "--model", model, "--mask_ratio", str(mask_ratio), "--batch_size",
           str(cfg["batch"]), "--input_size", str(cfg["input_size"]), "--epochs", "2", "--warmup_epochs", "1",
           "--max_steps_per_epoch", str(cfg["steps"]), "--num_workers", str(cfg["workers"]), "--pin_mem",
           "--precision", cfg["e2e_precision"], "--device", device.type, "--data_path", str(data_path),
           "--train_list", str(subset), "--datasets_names", "chexpert", "chestxray_nih", "mimic_cxr",
           "--prepared_dir", str(work / f"prepared_{cfg['prepare_size']}"), "--random_resize_range", "0.5", "1.0",
           "--output_dir", str(out), "--log_dir", str(out), "--print_freq", "1000",
           "--gpu_augment_canvas", str(cfg["canvas"])] + [f"--source_weight={w}" for w in weights] \
        + (["--gpu_augment"] if gpu_augment else [])
    start = time.time()
    code, output = run_limited(cmd, limit_s)
    row = {"model": name, "mode": "end to end" + (", --gpu_augment" if gpu_augment else ", CPU augment"),
           "precision": cfg["e2e_precision"], "compiled": False, "wall_s": time.time() - start,
           "measured_at": time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(start)), "output_dir": str(out)}
    return {**row, **epoch_line_result(out, code, output, limit_s)}


def fresh_run_dir(work: Path, name: str) -> Path:
    """A folder no earlier run used: auto-resume into an earlier run's folder would report that run's numbers as
    new ones."""
    stem = f"{name}_{time.strftime('%Y%m%d-%H%M%S')}"
    out, k = work / stem, 1
    while out.exists():
        out, k = work / f"{stem}_{k}", k + 1
    out.mkdir(parents=True)
    return out


def epoch_line_result(out: Path, code: int | None, output: str, limit_s: float) -> dict:
    """A training run's measurement: its second epoch's log.txt line, or what went wrong."""
    lines = (out / "log.txt").read_text().splitlines() if (out / "log.txt").exists() else []
    if code is None:
        return {"error": f"timed out: stopped after its {limit_s:g} s limit", "timed_out": True}
    if code != 0 or len(lines) < 2:
        return {"error": f"exit code {code}: " + " | ".join(output.strip().splitlines()[-3:])}
    stats = json.loads(lines[-1])
    return {"images_per_s": stats["train_images_per_s"], "data_wait_fraction": stats["train_data_wait_fraction"],
            "max_memory_mb": stats.get("train_max_memory_mb")}


def measure_finetune(device, work: Path, cfg, limit_s: float) -> dict:
    """ViT fine-tuning as main_finetune_chestxray.py runs it (bf16 on a GPU), 2 epochs on generated labelled
    images; the second epoch's images/s. No pre-trained weights: the step costs the same."""
    from data.synthetic import make_nih_labelled

    smoke = cfg["models"] is SMOKE_MODELS
    batch, size = (4, 32) if smoke else (64, 224)
    root = work / "labelled"
    if not (root / "train_labelled.txt").exists():
        make_nih_labelled(str(root), patients=(8, 3, 3) if smoke else (6 * batch, 8, 8), size=(size + 32,) * 2)
    out = fresh_run_dir(work, "finetune")
    cmd = [sys.executable, "main_finetune_chestxray.py", "--model", "vit_debug_patch16" if smoke else
           "vit_small_patch16", "--data_path", str(root), "--train_list", str(root / "train_labelled.txt"),
           "--val_list", str(root / "val_labelled.txt"), "--test_list", str(root / "test_labelled.txt"),
           "--input_size", str(size), "--batch_size", str(batch), "--epochs", "2", "--warmup_epochs", "1",
           "--max_steps_per_epoch", str(cfg["steps"]), "--num_workers", str(cfg["workers"]), "--device",
           device.type, "--precision", cfg["e2e_precision"], "--bootstrap", "0", "--output_dir", str(out),
           "--log_dir", str(out), "--print_freq", "1000"]
    start = time.time()
    code, output = run_limited(cmd, limit_s)
    row = {"model": "vit_s fine-tuning" if not smoke else "vit_debug fine-tuning", "mode": "end to end, fine-tuning",
           "precision": cfg["e2e_precision"], "compiled": False, "wall_s": time.time() - start,
           "measured_at": time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(start)), "output_dir": str(out)}
    return {**row, **epoch_line_result(out, code, output, limit_s)}


def add_mfu(rows: list[dict], peak: float | None) -> None:
    """End-to-end rows take the FLOPs per image of the same model's model-only bf16 row."""
    flops = {r["model"]: r["flops_per_image"] for r in rows if r.get("flops_per_image")}
    for r in rows:
        per_image = r.get("flops_per_image") or flops.get(r["model"])
        r["mfu"] = per_image * r["images_per_s"] / peak if peak and per_image and "images_per_s" in r else None


def markdown(summary: dict) -> str:
    head = summary["environment"]
    lines = [f"# gpu-check: {head['device_name']} ({head['mode']})", "",
             f"torch {head['torch']}, CUDA {head['cuda']}, batch {summary['plan']['batch']}, "
             f"{summary['plan']['input_size']} px, {summary['plan']['steps']} timed steps; dense bf16 peak "
             f"{head['peak_tflops'] or 'n/a'} TFLOP/s ({head['peak_source']}); {summary['seconds']:.0f} s in all", "",
             "| test | outcome | s |", "|---|---|---|"]
    lines += [f"| {t['name']} | {t['outcome']} | {t['seconds']:.1f} |" for t in summary["tests"]]
    lines += ["", "| model | mode | precision | compiled | images/s | data wait | peak memory | MFU |",
              "|---|---|---|---|---|---|---|---|"]
    for r in summary["throughput"]:
        if "error" in r or "skipped" in r:
            what = f"failed: {r['error'][:120]}" if "error" in r else r["skipped"]
            lines.append(f"| {r['model']} | {r['mode']} | {r['precision']} | {'yes' if r['compiled'] else 'no'} | "
                         f"{what} | | | |")
            continue
        memory = f"{r['max_memory_mb'] / 1024:.1f} GiB" if r.get("max_memory_mb") else "n/a"
        mfu = f"{r['mfu']:.1%}" if r.get("mfu") is not None else "n/a"
        lines.append(f"| {r['model']} | {r['mode']} | {r['precision']} | {'yes' if r['compiled'] else 'no'} | "
                     f"{r['images_per_s']:.1f} | {r['data_wait_fraction']:.0%} | {memory} | {mfu} |")
    if head["mode"] == "CPU smoke mode":
        lines += ["", "**No GPU was tested.** Smoke mode: toy sizes on CPU, to keep this script working. These numbers "
                  "mean nothing."]
    return "\n".join(lines) + "\n"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="gpu_check", help="folder for gpu_check.json/.md (default: gpu_check)")
    parser.add_argument("--smoke", action="store_true", help="toy sizes even on a GPU (default: only without CUDA)")
    parser.add_argument("--skip_tests", action="store_true", help="throughput only")
    parser.add_argument("--skip_throughput", action="store_true", help="tests only")
    parser.add_argument("--budget_minutes", type=float, default=8,
                        help="start no measurement after this many minutes; the rest is listed as not measured "
                             "(default: 8)")
    parser.add_argument("--plan", action="store_true",
                        help="print the rows this call would run, in order, with their time limits, and exit")
    args = parser.parse_args()
    start = time.time()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    signs = gpu_signs()
    if device.type != "cuda" and signs and not args.smoke:
        print(f"gpu-check FAILED: this machine has a GPU ({'; '.join(signs)}) but torch sees no CUDA, so nothing "
              f"could be tested on it. {cuda_diagnosis()} (--smoke runs the CPU checks anyway, and proves nothing "
              "about the GPU.)", flush=True)
        return 2
    smoke = args.smoke or device.type != "cuda"
    cfg = plan(smoke)
    if args.plan:
        print(format_plan(planned_rows(cfg, args.skip_tests, args.skip_throughput), smoke, args.budget_minutes))
        return 0
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    name, peak = peak_flops(device)
    environment = {"device_name": name, "mode": "CPU smoke mode" if smoke and device.type == "cpu" else
                   ("GPU smoke mode" if smoke else "full"), "torch": torch.__version__, "cuda": torch.version.cuda,
                   "peak_tflops": peak / 1e12 if peak else None, "python": platform.python_version(),
                   "gpu_tested": device.type == "cuda",
                   "peak_source": ("datasheet, by exact name" if peak else
                                   f"unknown: {name!r} is not in DENSE_BF16_PEAK, MFU not computed")}
    print(f"gpu-check on {name} ({environment['mode']}), torch {torch.__version__}", flush=True)
    budget_s = args.budget_minutes * 60
    tests, rows = [], []
    data_path = None
    for row in planned_rows(cfg, args.skip_tests, args.skip_throughput):
        # a row starts only if its whole time limit fits in what is left of the budget: the call ends in time
        if time.time() - start + row["limit_s"] > budget_s:
            skipped = {"model": row.get("model", row["what"]), "mode": row["what"], "precision": row.get("precision"),
                       "compiled": row.get("compiled", False),
                       "skipped": f"not started: its {row['limit_s']} s limit did not fit the {args.budget_minutes:g}"
                                  "-minute budget left"}
            (tests.append({"name": row["what"], "outcome": "skipped (budget)", "seconds": 0.0, "detail": ""})
             if row["kind"] == "tests" else rows.append(skipped))
            continue
        if row["kind"] == "tests":
            tests = run_tests(device, out, row["limit_s"])
            continue
        if row["kind"] == "model_only":
            result = measure_model_only(row["model"], cfg["models"][row["model"]], device, row["precision"],
                                        row["compiled"], cfg, row["limit_s"])
        elif row["kind"] == "end_to_end":
            data_path = data_path or make_prepared_data(out / "work", cfg)
            result = measure_end_to_end(row["model"], cfg["models"][row["model"]], device, row["gpu_augment"],
                                        data_path, out / "work", cfg, row["limit_s"])
        else:
            result = measure_finetune(device, out / "work", cfg, row["limit_s"])
        rows.append(result)
        print(f"  {json.dumps(result)}", flush=True)
    add_mfu(rows, peak)
    summary = {"environment": environment, "plan": {k: cfg[k] for k in ("batch", "input_size", "steps", "workers")},
               "tests": tests, "throughput": rows, "seconds": time.time() - start}
    (out / "gpu_check.json").write_text(json.dumps(summary, indent=1))
    (out / "gpu_check.md").write_text(markdown(summary))
    print(markdown(summary))
    failed = [t["name"] for t in tests if t["outcome"] not in ("passed", "skipped (budget)")] + \
        [f"{r['model']} {r['mode']} {r['precision']}" for r in rows if "error" in r]
    if not tests and not args.skip_tests:
        failed.append("no test ran")
    skipped = [t["name"] for t in tests if t["outcome"] == "skipped (budget)"] + \
        [r["mode"] for r in rows if "skipped" in r]
    tested = "" if device.type == "cuda" else " (no GPU was tested: CPU smoke mode)"
    verdict = (f"FAILED: {', '.join(failed)}" if failed else
               f"NOT COMPLETE, {len(skipped)} row(s) not started for the budget: {', '.join(skipped)}" if skipped
               else f"every check passed{tested}")
    print(f"wrote {out / 'gpu_check.json'} and {out / 'gpu_check.md'} in {time.time() - start:.0f} s; {verdict}")
    return EXIT_FAILED if failed else EXIT_INCOMPLETE if skipped else 0


if __name__ == "__main__":
    sys.exit(main())
