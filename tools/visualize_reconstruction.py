"""Reconstruction grids from a checkpoint: original | masked | reconstruction | reconstruction + visible patches.

    python -m tools.visualize_reconstruction --checkpoint runs/vit_s/checkpoint-799.pth --images a.png b.jpg --out vis/
    python -m tools.visualize_reconstruction --checkpoint ... --datasets_names chexpert --num 8 --out vis/

One PNG per image. Panels use the run's own normalisation (stored in the checkpoint). With norm_pix_loss the
predicted patches are de-normalised with the ground-truth patch mean/variance, and those panels are labelled
as display-only. --mask_seed fixes the mask, so grids from different epochs are comparable.
"""
import argparse
import os
import sys

import torch

import data
from data.image_io import load_gray
from data.transforms import build_eval_transform, norm_stats_for
from tools.checkpoint_model import model_from_checkpoint
from tools.reporting import check_outputs, run_tool
from util.errors import SetupError
from util.vis import save_reconstruction_png


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", required=True)
    parser.add_argument("--images", nargs="*", default=[], help="image files (PNG, JPEG, DICOM)")
    parser.add_argument("--datasets_names", nargs="*", default=[], help="or: take images from these sources")
    parser.add_argument("--data_path", default="data", help="root for --datasets_names (default: data)")
    parser.add_argument("--num", type=int, default=4, help="images per source with --datasets_names (default: 4)")
    parser.add_argument("--mask_seed", type=int, default=1234, help="seed of the mask (default: 1234)")
    parser.add_argument("--mask_ratio", type=float, default=None, help="default: the run's")
    parser.add_argument("--out", required=True, help="folder for the PNGs")
    parser.add_argument("--overwrite", action="store_true", help="replace PNGs of the same names in --out "
                        "(default: off, they are refused)")
    args = parser.parse_args()
    if not args.images and not args.datasets_names:
        parser.error("give --images or --datasets_names")
    return run_tool(lambda: visualize(args))


def visualize(args) -> int:
    if os.path.isfile(args.out):
        raise SetupError(f"--out {args.out} is a file; give a folder for the PNGs")
    model, run_args, ckpt = model_from_checkpoint(args.checkpoint)
    missing = [path for path in args.images if not os.path.isfile(path)]
    if missing:
        raise SetupError(f"--images: {', '.join(missing)} not found")
    per_source = (ckpt.get("norm_stats") or {}).get("per_source", {})
    jobs = []  # (label, gray image, source name for the statistics)
    for path in args.images:
        jobs.append((os.path.splitext(os.path.basename(path))[0], load_gray(path), run_args.datasets_names[0]))
    if args.datasets_names:
        # the run's own NIH list: the default train_official.txt needs the whole NIH download
        dataset, _ = data.build_pretrain_dataset(args.datasets_names, data_path=args.data_path,
                                                 input_size=run_args.input_size, train_list=run_args.train_list)
        for source in dataset.datasets:
            jobs += [(f"{source.name}_{i}", source.load(i), source.name) for i in range(min(args.num, len(source)))]
    check_outputs([os.path.join(args.out, f"{label}.png") for label, _, _ in jobs], [args.checkpoint, *args.images],
                  args.overwrite)
    os.makedirs(args.out, exist_ok=True)
    mask_ratio = run_args.mask_ratio if args.mask_ratio is None else args.mask_ratio
    for label, image, source in jobs:
        mean, std = per_source.get(source) or norm_stats_for(source, run_args.norm_stats, run_args.in_chans)
        tensor = build_eval_transform(run_args.input_size, mean, std, run_args.in_chans)(image).unsqueeze(0)
        path = os.path.join(args.out, f"{label}.png")
        with torch.no_grad():
            loss, _ = save_reconstruction_png(path, model, tensor, mask_ratio, args.mask_seed, mean, std,
                                              f"{label}  epoch {ckpt.get('epoch')}")
        print(f"wrote {path} (loss {loss:.4f})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
