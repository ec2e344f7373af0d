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
import json
import os
import sys

import torch

import models_mae
import models_mae_cnn
from tools.checkpoint_model import model_from_checkpoint
from util.log import git_commit


def export_vit(model, input_size, in_chans):
    import timm

    state = models_mae.to_timm_state_dict(model.state_dict(), input_size, in_chans)
    name, kwargs = models_mae.timm_config(model)
    kwargs.update(img_size=input_size or kwargs["img_size"], in_chans=in_chans or kwargs["in_chans"])
    target = timm.create_model(name, pretrained=False, **kwargs)
    target.load_state_dict(state, strict=True)  # num_classes=0: no head, so every key must match
    same_input = (input_size in (None, model.patch_embed.img_size[0])) and in_chans in (None, model.in_chans)
    probe = torch.randn(2, kwargs["in_chans"], kwargs["img_size"], kwargs["img_size"])
    with torch.no_grad():
        ours = target.forward_features(probe)
        reference = model.forward_features(probe) if same_input else None
    return state, {"format": "timm", "timm_model": name, "timm_kwargs": kwargs}, ours, reference


def export_cnn(model, args):
    import torchvision

    target_name, state = models_mae_cnn.to_torchvision_state_dict(model.encoder_state_dict(), args.model)
    net = getattr(torchvision.models, args.model)()
    if args.in_chans != 3:
        first = "features.conv0" if args.model.startswith("densenet") else "conv1"
        parent, attr = first.rsplit(".", 1) if "." in first else ("", first)
        holder = net.get_submodule(parent) if parent else net
        old = getattr(holder, attr)
        setattr(holder, attr, torch.nn.Conv2d(args.in_chans, old.out_channels, old.kernel_size, old.stride,
                                              old.padding, bias=old.bias is not None))
    backbone = net.features if args.model.startswith("densenet") else torch.nn.Sequential(
        *list(net.children())[:-2])
    if args.model.startswith("densenet"):
        backbone.load_state_dict(state, strict=True)
    else:
        missing, unexpected = net.load_state_dict(state, strict=False)
        if sorted(missing) != ["fc.bias", "fc.weight"] or unexpected:
            raise RuntimeError(f"unexpected keys loading into torchvision: missing {missing}, unexpected {unexpected}")
    probe = torch.randn(2, args.in_chans, args.input_size, args.input_size)
    with torch.no_grad():
        ours = backbone.eval()(probe)
        encoder = model.model.encoder.eval()
        reference = encoder.features(probe) if args.model.startswith("densenet") else encoder(probe)[-1]
    return state, {"format": "torchvision", "torchvision_target": target_name}, ours, reference


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", required=True, help="a pre-training checkpoint (ours or the reference's)")
    parser.add_argument("--out", required=True, help="output path without extension: writes OUT.pth and OUT.json")
    parser.add_argument("--input_size", type=int, default=None, help="ViT: resample position embeddings to this size")
    parser.add_argument("--in_chans", type=int, default=None, choices=[1, 3], help="ViT: adapt the patch embedding")
    args = parser.parse_args()
    model, run_args, ckpt = model_from_checkpoint(args.checkpoint)
    is_vit = isinstance(model, models_mae.MaskedAutoencoderViT)
    if not is_vit and (args.input_size or args.in_chans):
        parser.error("--input_size/--in_chans apply to ViT exports; CNN encoders take any size divisible by 32")
    if is_vit:
        state, target, ours, reference = export_vit(model, args.input_size, args.in_chans)
    else:
        state, target, ours, reference = export_cnn(model, run_args)
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    torch.save(state, args.out + ".pth")
    reloaded = torch.load(args.out + ".pth", weights_only=True)
    assert all(torch.equal(reloaded[k], state[k]) for k in state), "the written file does not read back"
    if reference is not None:
        torch.testing.assert_close(ours, reference, rtol=1e-4, atol=1e-4)
    norm = ckpt.get("norm_stats") or {"policy": getattr(run_args, "norm_stats", "dataset"), "per_source": {}}
    sidecar = {
        "architecture": run_args.model, **target,
        "input_size": args.input_size or run_args.input_size, "in_chans": args.in_chans or run_args.in_chans,
        "normalization": norm, "mask_ratio": run_args.mask_ratio, "norm_pix_loss": run_args.norm_pix_loss,
        "sources": list(run_args.datasets_names), "epoch": ckpt.get("epoch"),
        "checkpoint": os.path.abspath(args.checkpoint), "git_commit": git_commit(short=False),
        "features_checked": reference is not None,
    }
    with open(args.out + ".json", "w", encoding="utf-8") as f:
        json.dump(sidecar, f, indent=2)
    check = "features match the checkpoint's encoder" if reference is not None else "loads strictly (resampled)"
    print(f"wrote {args.out}.pth ({len(state)} tensors, {check}) and {args.out}.json")
    return 0


if __name__ == "__main__":
    sys.exit(main())
