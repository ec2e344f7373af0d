"""One embedding per image from a pre-trained encoder, with a fingerprint that tells whether features changed.

    python -m tools.extract_features --checkpoint runs/vit_s/checkpoint-799.pth --data data/my_images \
        --out features/vit_s --pool both
    python -m tools.extract_features ... --check features/vit_s.json    # the same features as that run, or an error

--checkpoint is a pre-training checkpoint of either family (ours or the reference's). --data is a folder (every image
below it, sorted) or a text file with one image path per line (relative to the file's folder, or absolute); any
image pre-training reads (PNG, JPEG, 16-bit PNG, DICOM). Each image is resized to --input_size (default: the
checkpoint's; a ViT takes only that) and normalised with --norm_stats, as the pre-training's evaluation transform does.

--pool: ViT: cls (the class token after the final norm, MAE's linear-probe feature), mean (the mean of the patch
tokens, MAE's fine-tuning pooling, before fc_norm) or both (cls then mean, side by side); U-Net: mean (the deepest
encoder stage averaged over space). Writes OUT.npy (float32, [images, dim]), OUT.csv (row, image) and OUT.json, the
sidecar, last. Batched on the GPU when there is one. Resumable: a killed run leaves OUT.partial.npy and
OUT.progress.json (written after every batch), and the same command continues from the last finished batch.

The fingerprint is a hash of three parts, each also in the sidecar: the weights (sha256 of every encoder tensor),
the preprocessing (size, channels, mean/std, resize), and the feature of a fixed synthetic probe image rounded to 3
decimals (the probe catches a library version that computes the same weights differently). --check FINGERPRINT
(or an earlier sidecar's path) stops before extracting if this setup does not reproduce it, naming the part that
differs.
"""
import argparse
import hashlib
import json
import logging
import os
import sys
import time

import numpy as np
import torch

from data.image_io import load_gray
from data.synthetic import chest_image
from data.transforms import build_eval_transform, check_norm_policy, norm_stats_for
from tools.checkpoint_model import model_from_checkpoint
from tools.reporting import check_outputs, run_tool
from util.errors import SetupError
from util.log import write_json

logger = logging.getLogger("extract_features")

POOLS = ("cls", "mean", "both")
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".dcm", ".dicom", ".tif", ".tiff", ".bmp")
PROBE_SEED = 20231102  # the synthetic probe image: chest_image(input_size, input_size, PROBE_SEED)
PROBE_DECIMALS = 3
PARTS = ("weights", "preprocessing", "probe_feature")  # what the fingerprint hashes


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", required=True, help="a pre-training checkpoint (ViT MAE or U-Net)")
    parser.add_argument("--data", required=True, help="a folder of images, or a text file of image paths")
    parser.add_argument("--out", required=True, help="output path without extension: OUT.npy, OUT.csv, OUT.json")
    parser.add_argument("--pool", default=None, choices=POOLS,
                        help="ViT: cls, mean or both; U-Net: mean (default: cls for a ViT, mean for a U-Net)")
    parser.add_argument("--input_size", type=int, default=None, help="image size (default: the checkpoint's)")
    parser.add_argument("--norm_stats", default="cxr",
                        help="normalisation: cxr (0.5056/0.252, NIH's), imagenet, 'MEAN,STD' or a JSON file from "
                             "tools/compute_norm_stats.py (default: cxr)")
    parser.add_argument("--batch_size", type=int, default=64, help="images per batch (default: 64)")
    parser.add_argument("--num_workers", type=int, default=4, help="data-loading processes (default: 4)")
    parser.add_argument("--device", default=None, help="cuda or cpu (default: cuda when available)")
    parser.add_argument("--check", default=None, metavar="FINGERPRINT",
                        help="stop unless this setup reproduces FINGERPRINT (a fingerprint string, or an earlier "
                             "run's OUT.json) (default: none)")
    parser.add_argument("--overwrite", action="store_true", help="replace finished outputs (default: off)")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    return run_tool(lambda: extract(args))


# ---- the encoder and its features --------------------------------------------------------------------------------

class Encoder:
    """A pre-training model's encoder as a feature function: images [N, C, s, s] -> [N, dim] for --pool."""

    def __init__(self, model, pool: str):
        self.model, self.vit = model, hasattr(model, "blocks")
        if not self.vit and pool != "mean":
            raise SetupError(f"--pool {pool}: a U-Net encoder has no class token; use --pool mean")
        self.pool = pool

    def state_dict(self) -> dict:
        state = self.model.state_dict()
        if self.vit:
            return {k: v for k, v in state.items() if not k.startswith(("decoder_", "mask_token"))}
        return {k: v for k, v in state.items() if k.startswith("model.encoder.")}

    @torch.no_grad()
    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        if not self.vit:
            return self.model.probe_features(images)
        tokens = self.model.forward_features(images)
        cls, mean = tokens[:, 0], tokens[:, 1:].mean(dim=1)
        return {"cls": cls, "mean": mean, "both": torch.cat([cls, mean], dim=1)}[self.pool]


def weights_hash(state: dict) -> str:
    digest = hashlib.sha256()
    for key in sorted(state):
        digest.update(key.encode())
        digest.update(state[key].detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()[:16]


def probe_feature(encoder: Encoder, transform, input_size: int, device) -> np.ndarray:
    """The feature of the fixed synthetic probe image: its length is the features', and it joins the fingerprint."""
    return encoder(transform(_probe_image(input_size))[None].to(device))[0].float().cpu().numpy()


def fingerprint_parts(encoder: Encoder, preprocessing: dict, feature: np.ndarray) -> dict:
    rounded = np.round(feature.astype(np.float64), PROBE_DECIMALS) + 0.0  # + 0.0: no negative zero
    return {"weights": weights_hash(encoder.state_dict()),
            "preprocessing": hashlib.sha256(json.dumps(preprocessing, sort_keys=True).encode()).hexdigest()[:16],
            "probe_feature": hashlib.sha256(rounded.tobytes()).hexdigest()[:16]}


def _probe_image(size: int):
    from PIL import Image
    return Image.fromarray(chest_image(size, size, PROBE_SEED))


def fingerprint(parts: dict) -> str:
    return hashlib.sha256("/".join(parts[k] for k in PARTS).encode()).hexdigest()[:20]


def check_fingerprint(given: str, parts: dict) -> None:
    """--check: a fingerprint string, or an earlier sidecar (then the differing part is named)."""
    if os.path.isfile(given):
        with open(given, encoding="utf-8") as f:
            earlier = json.load(f)
        differ = [k for k in PARTS if earlier["fingerprint_parts"][k] != parts[k]]
        if differ:
            why = {"weights": "the encoder's weights differ", "preprocessing": "the preprocessing differs (input "
                   f"size, channels, mean/std: {earlier['preprocessing']} there)",
                   "probe_feature": "the same weights and preprocessing give another probe feature (another torch/"
                   f"timm version or device computes differently: {earlier.get('versions')} there)"}
            raise SetupError(f"--check {given}: this setup does not reproduce its features: "
                             + "; ".join(why[k] for k in differ))
        return
    if given != fingerprint(parts):
        raise SetupError(f"--check {given}: this setup's fingerprint is {fingerprint(parts)} ({parts}); pass the "
                         "earlier run's sidecar (OUT.json) to see which part differs")


# ---- the images ---------------------------------------------------------------------------------------------------

def list_images(data: str) -> list[str]:
    if os.path.isdir(data):
        found = sorted(os.path.join(folder, name) for folder, _, names in os.walk(data) for name in names
                       if name.lower().endswith(IMAGE_EXTENSIONS))
        if not found:
            raise SetupError(f"--data {data}: no image file ({', '.join(IMAGE_EXTENSIONS)}) below this folder")
        return found
    if not os.path.isfile(data):
        raise FileNotFoundError(f"--data {data}: no such folder or list file")
    base = os.path.dirname(os.path.abspath(data))
    with open(data, encoding="utf-8-sig") as f:
        paths = [line.strip() for line in f if line.strip()]
    paths = [p if os.path.isabs(p) else os.path.join(base, p) for p in paths]
    missing = [p for p in paths if not os.path.isfile(p)]
    if missing:
        raise FileNotFoundError(f"--data {data}: {len(missing)} of {len(paths)} listed images are missing, e.g. "
                                f"{missing[:3]} (relative paths are read from the list's folder)")
    if not paths:
        raise SetupError(f"--data {data} lists no image")
    return paths


class Images(torch.utils.data.Dataset):
    def __init__(self, paths: list[str], transform):
        self.paths, self.transform = paths, transform

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int):
        return self.transform(load_gray(self.paths[i])), i


# ---- the run ------------------------------------------------------------------------------------------------------

def extract(args) -> int:
    out = {ext: args.out + ext for ext in (".npy", ".csv", ".json")}
    partial, progress_path = args.out + ".partial.npy", args.out + ".progress.json"
    check_outputs(list(out.values()), [args.checkpoint, args.data], args.overwrite)
    problem = check_norm_policy(args.norm_stats)
    if problem or args.norm_stats == "dataset":
        raise SetupError(problem or "--norm_stats dataset needs a dataset; give cxr, imagenet, 'MEAN,STD' or a file")
    model, run_args, _ = model_from_checkpoint(args.checkpoint)
    pool = args.pool or ("cls" if hasattr(model, "blocks") else "mean")
    encoder = Encoder(model, pool)
    paths = list_images(args.data)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    model.to(device).eval()
    input_size = args.input_size or run_args.input_size
    if encoder.vit and input_size != model.patch_embed.img_size[0]:
        raise SetupError(f"--input_size {input_size}: this MAE's position table is fixed at {run_args.input_size} "
                         "pixels; leave --input_size out (features at another size would be another model's)")
    if not encoder.vit and input_size % 32:
        raise SetupError(f"--input_size {input_size}: a U-Net encoder needs a multiple of 32")
    mean, std = norm_stats_for("", args.norm_stats, model.in_chans)
    preprocessing = {"input_size": input_size, "in_chans": model.in_chans, "mean": mean, "std": std,
                     "resize": "Resize((s, s)), bilinear, antialiased (the pre-training's evaluation transform)",
                     "decode": "data.image_io.load_gray (8-bit gray; 16-bit and DICOM windowed)"}
    transform = build_eval_transform(input_size, mean, std, model.in_chans)
    probe = probe_feature(encoder, transform, input_size, device)
    parts = fingerprint_parts(encoder, preprocessing, probe)
    if args.check:
        check_fingerprint(args.check, parts)
    list_hash = hashlib.sha256("\n".join(paths).encode()).hexdigest()[:16]
    dim = len(probe)
    start = resume_point(progress_path, partial, parts, list_hash, (len(paths), dim))
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    features = np.lib.format.open_memmap(partial, mode="r+" if start else "w+", dtype=np.float32,
                                         shape=(len(paths), dim))
    loader = torch.utils.data.DataLoader(Images(paths, transform), batch_size=args.batch_size,
                                         sampler=range(start, len(paths)), num_workers=args.num_workers,
                                         pin_memory=device.type == "cuda")
    logger.info("%d images, %s features of %d values, on %s%s", len(paths), pool, dim, device,
                f"; resuming at image {start}" if start else "")
    began, done, batches = time.time(), start, len(loader)
    for b, (images, rows) in enumerate(loader):
        features[rows.numpy()] = encoder(images.to(device, non_blocking=True)).float().cpu().numpy()
        done = int(rows[-1]) + 1
        features.flush()  # then the progress record: a kill between the two redoes one batch, never skips one
        write_json(progress_path, {"done": done, "fingerprint_parts": parts, "list": list_hash,
                                   "shape": [len(paths), dim]})
        if (b + 1) % 20 == 0 or b + 1 == batches:
            rate = (done - start) / max(time.time() - began, 1e-9)
            logger.info("%d/%d images, %.1f images/s, eta %.0f s", done, len(paths), rate, (len(paths) - done) / rate)
    features.flush()
    del features
    os.replace(partial, out[".npy"])
    with open(out[".csv"] + ".tmp", "w", encoding="utf-8") as f:
        f.write("row,image\n" + "".join(f"{i},{json.dumps(p)}\n" for i, p in enumerate(paths)))
    os.replace(out[".csv"] + ".tmp", out[".csv"])
    sidecar = {"fingerprint": fingerprint(parts), "fingerprint_parts": parts, "preprocessing": preprocessing,
               "pool": pool, "layout": "cls then mean" if pool == "both" else pool, "shape": [len(paths), dim],
               "checkpoint": os.path.abspath(args.checkpoint), "model": run_args.model, "data": args.data,
               "versions": {"torch": torch.__version__, "timm": _version("timm"), "device": str(device)}}
    write_json(out[".json"], sidecar)  # last: the extraction is complete
    if os.path.exists(progress_path):
        os.remove(progress_path)
    print(f"wrote {out['.npy']} ({len(paths)} x {dim}), {out['.csv']} and {out['.json']}; fingerprint "
          f"{sidecar['fingerprint']}")
    return 0


def resume_point(progress_path: str, partial: str, parts: dict, list_hash: str, shape: tuple) -> int:
    """The first image still to extract: 0, or where a killed run of the same setup and list stopped."""
    if not (os.path.isfile(progress_path) and os.path.isfile(partial)):
        return 0
    with open(progress_path, encoding="utf-8") as f:
        progress = json.load(f)
    if progress["fingerprint_parts"] != parts or progress["list"] != list_hash or tuple(progress["shape"]) != shape:
        raise SetupError(f"{partial} holds a killed extraction of another setup or image list; delete it and "
                         f"{progress_path} to start over")
    return int(progress["done"])


def _version(package: str) -> str:
    from importlib.metadata import version
    return version(package)


if __name__ == "__main__":
    sys.exit(main())
