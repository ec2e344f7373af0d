"""Export the encoder of a pre-training checkpoint for fine-tuning, with a JSON sidecar.

    python -m tools.export_encoder --checkpoint runs/vit_s/checkpoint-799.pth --out exports/vit_s
    python -m tools.export_encoder --checkpoint ... --out ... --input_size 384 --in_chans 1

ViT runs give a timm VisionTransformer state dict (load with strict=True into timm.create_model(name, num_classes=0)
or drop nothing but the head); CNN runs give the torchvision backbone (densenet*: `.features`, resnet*: the model
without `fc`). Writes <out>.pth (weights_only-loadable) and <out>.json (architecture, input size, channels,
mean/std, mask ratio, norm_pix_loss, sources, epoch, git commit). The written file is reloaded into the target
model and its features are compared with the checkpoint's encoder on a probe batch.
"""
import argparse
import os
import sys

import torch

from tools.checkpoint_model import model_from_checkpoint
from tools.reporting import check_outputs, run_tool
from util.checkpoint import atomic_save
from util.errors import SetupError
from util.log import git_commit, write_json


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", required=True, help="a pre-training checkpoint (ours or the reference's)")
    parser.add_argument("--out", required=True, help="output path without extension: writes OUT.pth and OUT.json")
    parser.add_argument("--input_size", type=int, default=None, help="ViT: resample position embeddings to this size")
    parser.add_argument("--in_chans", type=int, default=None, choices=[1, 3], help="ViT: adapt the patch embedding")
    parser.add_argument("--overwrite", action="store_true", help="replace OUT.pth and OUT.json if they exist "
                        "(default: off, an existing export is refused)")
    args = parser.parse_args()
    return run_tool(lambda: export(args))


def export(args) -> int:
    out_pth, out_json = args.out + ".pth", args.out + ".json"
    check_outputs([out_pth, out_json], [args.checkpoint], args.overwrite)
    model, run_args, ckpt = model_from_checkpoint(args.checkpoint)
    if args.input_size is not None and (args.input_size < model.patch_size or args.input_size % model.patch_size):
        nearest = max(1, round(args.input_size / model.patch_size)) * model.patch_size
        raise SetupError(f"--input_size {args.input_size}: the encoder's patches are {model.patch_size} pixels; give "
                         f"a multiple of {model.patch_size} (e.g. {nearest})")
    export = model.export_encoder(args.input_size, args.in_chans)
    state = export.state_dict
    probe = torch.randn(2, export.in_chans, export.input_size, export.input_size)
    with torch.no_grad():
        ours = export.target_features(probe)
        reference = export.reference_features(probe) if export.reference_features else None
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    atomic_save(state, out_pth)
    reloaded = torch.load(out_pth, weights_only=True)
    assert all(torch.equal(reloaded[k], state[k]) for k in state), "the written file does not read back"
    if reference is not None:
        torch.testing.assert_close(ours, reference, rtol=1e-4, atol=1e-4)
    norm = ckpt.get("norm_stats") or {"policy": getattr(run_args, "norm_stats", "dataset"), "per_source": {}}
    sidecar = {
        "architecture": run_args.model, **export.meta, "input_size": export.input_size, "in_chans": export.in_chans,
        "normalization": norm, "mask_ratio": run_args.mask_ratio, "norm_pix_loss": run_args.norm_pix_loss,
        "sources": list(run_args.datasets_names), "epoch": ckpt.get("epoch"),
        "checkpoint": os.path.abspath(args.checkpoint), "git_commit": git_commit(short=False),
        "features_checked": reference is not None,
    }
    write_json(out_json, sidecar)
    check = "features match the checkpoint's encoder" if reference is not None else "loads strictly (resampled)"
    print(f"wrote {args.out}.pth ({len(state)} tensors, {check}) and {args.out}.json")
    return 0


if __name__ == "__main__":
    sys.exit(main())
