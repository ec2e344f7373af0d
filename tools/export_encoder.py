"""Export the encoder of a pre-training checkpoint for fine-tuning, with a JSON sidecar.

    python -m tools.export_encoder --checkpoint runs/vit_s/checkpoint-799.pth --out exports/vit_s
    python -m tools.export_encoder --checkpoint ... --out ... --input_size 384 --in_chans 1

    python -m tools.export_encoder --checkpoint runs/vit_s/checkpoint-799.pth --out exports/vit_s_hf --format hf

ViT runs give a timm VisionTransformer state dict (load with strict=True into timm.create_model(name, num_classes=0)
or drop nothing but the head); CNN runs give the torchvision backbone (densenet*: `.features`, resnet*: the model
without `fc`). Writes <out>.pth (weights_only-loadable), the same weights as <out>.safetensors, and <out>.json
(architecture, input size, channels, mean/std, mask ratio, norm_pix_loss, sources, epoch, git commit). The written
file is reloaded into the target model and its features are compared with the checkpoint's encoder on a probe batch.

--format hf (ViTs) writes a folder for Hugging Face transformers instead: <out>/config.json and
<out>/model.safetensors, which transformers.ViTModel.from_pretrained(<out>) loads offline (last_hidden_state: our
encoder's forward_features; pooler_output: its class token after the final norm), and <out>/medmae_export.json,
the sidecar.
"""
import argparse
import os
import sys

import torch

import models_mae
from tools.checkpoint_model import model_from_checkpoint
from tools.reporting import check_outputs, run_tool
from util.checkpoint import atomic_save
from util.errors import SetupError
from util.log import git_commit, write_json

FORMATS = ("torch", "hf")
HF_CONFIG, HF_WEIGHTS, HF_SIDECAR = "config.json", "model.safetensors", "medmae_export.json"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", required=True, help="a pre-training checkpoint (ours or the reference's)")
    parser.add_argument("--out", required=True, help="output path without extension: writes OUT.pth, OUT.safetensors "
                        "and OUT.json (--format hf: the folder OUT)")
    parser.add_argument("--format", default="torch", choices=FORMATS,
                        help="torch: OUT.pth and OUT.safetensors for timm/torchvision; hf: a Hugging Face "
                             "transformers ViTModel folder (ViTs) (default: torch)")
    parser.add_argument("--input_size", type=int, default=None, help="ViT: resample position embeddings to this size")
    parser.add_argument("--in_chans", type=int, default=None, choices=[1, 3], help="ViT: adapt the patch embedding")
    parser.add_argument("--overwrite", action="store_true", help="replace the outputs if they exist "
                        "(default: off, an existing export is refused)")
    args = parser.parse_args()
    return run_tool(lambda: export(args))


def export(args) -> int:
    hf = args.format == "hf"
    outputs = ([os.path.join(args.out, name) for name in (HF_CONFIG, HF_WEIGHTS, HF_SIDECAR)] if hf
               else [args.out + ext for ext in (".pth", ".safetensors", ".json")])
    check_outputs(outputs, [args.checkpoint], args.overwrite)
    model, run_args, ckpt = model_from_checkpoint(args.checkpoint)
    if hf and not hasattr(model, "blocks"):
        raise SetupError(f"--format hf writes a transformers ViTModel; {args.checkpoint} holds the CNN {run_args.model}"
                         " (export it with --format torch: a torchvision backbone)")
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
    check = "features match the checkpoint's encoder" if reference is not None else "loads strictly (resampled)"
    if hf:
        config, hf_state = models_mae.to_hf_vit(state, model.blocks[0].attn.num_heads)
        os.makedirs(args.out, exist_ok=True)
        write_safetensors(hf_state, os.path.join(args.out, HF_WEIGHTS))
        write_json(os.path.join(args.out, HF_CONFIG), config)
        write_json(os.path.join(args.out, HF_SIDECAR), {**sidecar, "format": "hf", "hf_class": "transformers.ViTModel",
                                                        "hf_pooler_output": "the class token after the final norm"})
        print(f"wrote {args.out}/ ({HF_CONFIG}, {HF_WEIGHTS}: {len(hf_state)} tensors, {HF_SIDECAR}); timm weights "
              f"{check}")
        return 0
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    atomic_save(state, args.out + ".pth")
    reloaded = torch.load(args.out + ".pth", weights_only=True)
    assert all(torch.equal(reloaded[k], state[k]) for k in state), "the written file does not read back"
    write_safetensors(state, args.out + ".safetensors")
    write_json(args.out + ".json", sidecar)
    print(f"wrote {args.out}.pth and {args.out}.safetensors ({len(state)} tensors, {check}) and {args.out}.json")
    return 0


def write_safetensors(state: dict, path: str) -> None:
    """The tensors as a .safetensors file, atomically, read back and compared."""
    from safetensors.torch import load_file, save_file

    save_file({k: v.contiguous() for k, v in state.items()}, path + ".tmp")
    os.replace(path + ".tmp", path)
    reloaded = load_file(path)
    assert reloaded.keys() == state.keys() and all(torch.equal(reloaded[k], state[k]) for k in state), \
        f"{path} does not read back"


if __name__ == "__main__":
    sys.exit(main())
