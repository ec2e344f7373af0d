"""Train-step images/s: the reference model code against ours, measured in the same run.

    python -m benchmarks.bench_step [--steps 4] [--compile] [--device cuda] [--precision bf16] [--batch 256]

Models: a ViT MAE (--vit_model, default the paper's ViT-S mae_vit_small_patch16_dec512d2b, mask 0.9) and the
DenseNet-121 U-Net (mask 0.75), 224 px, batch --batch.
"reference" reproduces the reference step: explicit attention (timm 0.3.2/0.4.12 blocks have no fused SDPA),
torch's default AdamW, fp16 through a GradScaler, a loss.item() every iteration, the SMP U-Net as the reference built
it (channels-first).
"ours" is this repository's training step itself, engine.train_one_epoch on a batch already on the device
(benchmarks/engine_step.py): SDPA attention, fused AdamW, the loss scaler, the gradient norm, the all-reduce and one
host sync per step, the channels_last U-Net. "ours as run" (CPU only) adds what the entry scripts set for CPU runs,
--keep_freed_memory (glibc keeps freed memory instead of unmapping it); "compile" is that plus torch.compile, built
once and timed over all rounds' steps in one process. Each variant runs in its own process, because the allocator
setting is per process; the reference and "ours" keep glibc's defaults.
"""
import argparse
import multiprocessing
import statistics
import time

import torch

import models_mae
import models_mae_cnn
from benchmarks.engine_step import model_only
from util.host_memory import keep_freed_memory
from util.optim import param_groups
from util.precision import LossScaler, autocast

MASK_RATIO = {"vit": 0.9, "cnn": 0.75}


class ReferenceRunner:
    """The reference step: its model code and optimizer, one loss.item() per iteration."""

    def __init__(self, kind, vit_model, device, precision, batch):
        torch.manual_seed(0)
        if kind == "vit":
            self.model = models_mae.create_model(vit_model, mask_ratio=MASK_RATIO[kind])
            for block in [*self.model.blocks, *self.model.decoder_blocks]:
                block.attn.fused_attn = False
        else:
            self.model = models_mae_cnn.create_model("densenet121", img_size=224, mask_ratio=MASK_RATIO[kind],
                                                     channels_last=False)
        self.model = self.model.to(device)
        self.optimizer = torch.optim.AdamW(param_groups(self.model, 0.05), lr=1e-4, betas=(0.9, 0.95))
        self.scaler = LossScaler(precision, device)  # the reference's NativeScaler: a GradScaler for fp16
        self.images = torch.randn(batch, 3, 224, 224, device=device)  # NCHW, as the data loader gives it
        self.device, self.precision = device, precision

    def step(self) -> float:
        start = time.perf_counter()
        with autocast(self.precision, self.device):
            loss, _, _ = self.model(self.images)
        loss.item()  # the reference reads the loss before backward, every iteration
        self.scaler.backward(loss)
        self.scaler.step_prepare(self.optimizer, self.model.parameters(), None)
        self.scaler.step_apply(self.optimizer)
        self.optimizer.zero_grad(set_to_none=True)
        if self.device.type == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - start


# variant: (model code, glibc keeps freed memory as the entry scripts make it do on CPU)
VARIANTS = {"reference": ("reference", False), "ours": ("ours", False), "ours as run": ("ours", True),
            "compile": ("compile", True)}


def measure(conn, kind, vit_model, variant, device, precision, batch, steps) -> None:
    """One variant in a fresh process of its own, since the allocator setting is per process; sends images/s."""
    code, keeps_freed = VARIANTS[variant]
    if keeps_freed and device.type == "cpu":
        keep_freed_memory()
    if code == "reference":
        runner = ReferenceRunner(kind, vit_model, device, precision, batch)
        runner.step()  # warm-up
        conn.send([batch / statistics.median(runner.step() for _ in range(steps))])
        return
    model = vit_model if kind == "vit" else "densenet121"
    result = model_only(kind, model, device, precision, batch, steps, compile_model=code == "compile",
                        mask_ratio=MASK_RATIO[kind])
    conn.send([result["images_per_s"]])


def images_per_s(kind, vit_model, variants, device, precision, batch, steps, rounds) -> dict[str, float]:
    """The variants take turns, one process alive at a time (a second resident process slows the page-faulting
    variants), for `rounds` rounds, so drift in the machine's speed is shared out among them. The compiled variant
    builds its graphs once: it runs all rounds' steps in its first turn."""
    ctx = multiprocessing.get_context("spawn")
    results = {v: [] for v in variants}
    for turn in range(rounds):
        for variant in variants:
            if variant == "compile" and turn:
                continue
            conn, child_conn = ctx.Pipe()
            n = steps * rounds if variant == "compile" else steps
            proc = ctx.Process(target=measure, args=(child_conn, kind, vit_model, variant, device, precision, batch,
                                                     n))
            proc.start()
            child_conn.close()  # so that recv() fails instead of waiting if the child dies
            try:
                results[variant] += conn.recv()
            except EOFError:
                proc.join()
                raise SystemExit(f"the {kind} '{variant}' process failed (exit code {proc.exitcode}); "
                                 "its error is printed above") from None
            proc.join()
    return {v: statistics.median(r) for v, r in results.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=4, help="timed steps per variant and round (default: 4)")
    parser.add_argument("--rounds", type=int, default=2,
                        help="turns each variant takes, each in a fresh process; median over all (default: 2)")
    parser.add_argument("--batch", type=int, default=16,
                        help="batch size (default: 16, for CPU; GPU runs use the recipes' 256)")
    parser.add_argument("--vit_model", default="mae_vit_small_patch16_dec512d2b",
                        help="the ViT MAE to time (default: mae_vit_small_patch16_dec512d2b)")
    parser.add_argument("--device", default="cpu", help="cpu or cuda (default: cpu)")
    parser.add_argument("--precision", default="fp32", choices=["fp32", "bf16", "fp16"], help="(default: fp32)")
    parser.add_argument("--compile", action="store_true", help="also measure torch.compile (slow to build)")
    parser.add_argument("--models", nargs="+", default=["vit", "cnn"], choices=["vit", "cnn"])
    args = parser.parse_args()
    device = torch.device(args.device)
    print(f"torch {torch.__version__}, device {device}, {torch.get_num_threads()} threads, precision {args.precision}, "
          f"batch {args.batch}, median over {args.rounds} rounds of {args.steps} steps, variants taking turns in fresh "
          "processes")
    variants = ["reference", "ours"] + (["ours as run"] if device.type == "cpu" else []) + \
        (["compile"] if args.compile else [])
    for kind in args.models:
        results = images_per_s(kind, args.vit_model, variants, device, args.precision, args.batch, args.steps,
                               args.rounds)
        for variant in variants:
            print(f"  {kind:4s} {variant:12s} {results[variant]:8.2f} img/s  "
                  f"({results[variant] / results['reference']:.2f}x reference)", flush=True)


if __name__ == "__main__":
    main()
