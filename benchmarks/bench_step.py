"""Train-step images/s: the reference model code against ours, measured in the same run.

    python -m benchmarks.bench_step [--steps 4] [--compile] [--device cuda] [--precision bf16]

Models: ViT-S MAE (mae_vit_small_patch16_dec128d2b, mask 0.9) and the DenseNet-121 U-Net, batch 16, 224 px.
"reference" reproduces the reference step: explicit attention (timm 0.3.2/0.4.12 blocks have no fused SDPA),
torch's default AdamW, a loss.item() every iteration, the SMP U-Net as the reference built it (channels-first).
"ours" is this repository's default step: SDPA attention, fused AdamW, the channels_last U-Net, one host sync per step.
"ours as run" (CPU only) adds what the entry scripts set for CPU runs, --keep_freed_memory (glibc keeps freed memory
instead of unmapping it); "compile" is that plus torch.compile. Each variant runs in its own process, because the
allocator setting is per process; the reference and "ours" keep glibc's defaults.
"""
import argparse
import multiprocessing
import statistics
import time

import torch

import models_mae
import models_mae_cnn
from util.host_memory import keep_freed_memory
from util.optim import build_optimizer, param_groups
from util.precision import autocast


def build(kind: str, variant: str, device):
    if kind == "vit":
        model = models_mae.create_model("mae_vit_small_patch16_dec128d2b", mask_ratio=0.9)
        if variant == "reference":
            for block in [*model.blocks, *model.decoder_blocks]:
                block.attn.fused_attn = False
    else:
        model = models_mae_cnn.create_model("densenet121", img_size=224, mask_ratio=0.75,
                                            channels_last=variant != "reference")
    model = model.to(device)
    if variant == "reference":
        optimizer = torch.optim.AdamW(param_groups(model, 0.05), lr=1e-4, betas=(0.9, 0.95))
    else:
        optimizer = build_optimizer(model, 0.05, 1e-4, device)
    if variant == "compile":
        model = torch.compile(model)
    return model, optimizer


class Runner:
    """One variant's model, optimizer and batch; step() runs and times one training step."""

    def __init__(self, kind, variant, device, precision, batch):
        torch.manual_seed(0)
        self.model, self.optimizer = build(kind, variant, device)
        self.images = torch.randn(batch, 3, 224, 224, device=device)  # NCHW, as the data loader gives it
        self.device, self.precision = device, precision

    def step(self) -> float:
        start = time.perf_counter()
        with autocast(self.precision, self.device):
            loss, _, _ = self.model(self.images)
        loss.backward()
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        loss.item()  # both variants sync once per step here; the reference also synced per iteration
        if self.device.type == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - start


# variant: (model code, glibc keeps freed memory as the entry scripts make it do on CPU)
VARIANTS = {"reference": ("reference", False), "ours": ("ours", False), "ours as run": ("ours", True),
            "compile": ("compile", True)}


def measure(conn, kind, variant, device, precision, batch, steps) -> None:
    """One variant in a fresh process of its own, since the allocator setting is per process."""
    code, keeps_freed = VARIANTS[variant]
    if keeps_freed and device.type == "cpu":
        keep_freed_memory()
    runner = Runner(kind, code, device, precision, batch)
    for _ in range(3 if code == "compile" else 1):  # warm-up (and compilation)
        runner.step()
    conn.send([runner.step() for _ in range(steps)])


def images_per_s(kind, variants, device, precision, batch, steps, rounds) -> dict[str, float]:
    """The variants take turns, one process alive at a time (a second resident process slows the page-faulting
    variants), for `rounds` rounds, so drift in the machine's speed is shared out among them."""
    ctx = multiprocessing.get_context("spawn")
    times = {v: [] for v in variants}
    for _ in range(rounds):
        for variant in variants:
            conn, child_conn = ctx.Pipe()
            proc = ctx.Process(target=measure, args=(child_conn, kind, variant, device, precision, batch, steps))
            proc.start()
            child_conn.close()  # so that recv() fails instead of waiting if the child dies
            try:
                times[variant] += conn.recv()
            except EOFError:
                proc.join()
                raise SystemExit(f"the {kind} '{variant}' process failed (exit code {proc.exitcode}); "
                                 "its error is printed above") from None
            proc.join()
    return {v: batch / statistics.median(t) for v, t in times.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=4, help="timed steps per variant and round (default: 4)")
    parser.add_argument("--rounds", type=int, default=2,
                        help="turns each variant takes, each in a fresh process; median over all (default: 2)")
    parser.add_argument("--batch", type=int, default=16, help="batch size (default: 16)")
    parser.add_argument("--device", default="cpu", help="cpu or cuda (default: cpu)")
    parser.add_argument("--precision", default="fp32", choices=["fp32", "bf16", "fp16"], help="(default: fp32)")
    parser.add_argument("--compile", action="store_true", help="also measure torch.compile (slow to build)")
    parser.add_argument("--models", nargs="+", default=["vit", "cnn"], choices=["vit", "cnn"])
    args = parser.parse_args()
    device = torch.device(args.device)
    print(f"torch {torch.__version__}, device {device}, {torch.get_num_threads()} threads, precision {args.precision}, "
          f"batch {args.batch}, median of {args.rounds} x {args.steps} steps, variants taking turns in fresh processes")
    variants = ["reference", "ours"] + (["ours as run"] if device.type == "cpu" else []) + \
        (["compile"] if args.compile else [])
    for kind in args.models:
        results = images_per_s(kind, variants, device, args.precision, args.batch, args.steps, args.rounds)
        for variant in variants:
            print(f"  {kind:4s} {variant:12s} {results[variant]:8.2f} img/s  "
                  f"({results[variant] / results['reference']:.2f}x reference)", flush=True)


if __name__ == "__main__":
    main()
