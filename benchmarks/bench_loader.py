"""Input pipeline images/s per core: the reference pipeline against ours, on the same generated files.

    python -m benchmarks.bench_loader [--seconds 3] [--repeats 3]

Files (synthetic chest X-rays): 390x320 JPEG (CheXpert-small), 2828x2320 JPEG (full-resolution
CheXpert/MIMIC), 1024x1024 PNG (NIH). Every pipeline ends in the same 3x224x224 normalised tensor
(RandomResizedCrop(224, scale=(0.5, 1), bicubic), flip). One thread, medians of --repeats runs.
Also prints the PSNR of reduced-scale (draft) JPEG decoding against full decoding. "decode alone, draft" is the
ceiling of any reduced-scale pipeline: libjpeg still entropy-decodes every byte at 1/2, 1/4 or 1/8 scale.
"decode alone, 1/8" decodes at libjpeg's smallest scale (DC coefficients only), too small for most crops: no
DCT-scaled pipeline can beat it.
"""
import argparse
import os
import statistics
import tempfile
import time

import numpy as np
import torch
from PIL import Image
from torchvision import transforms
from torchvision.transforms import InterpolationMode

from data import draft_min_side
from data.image_io import load_gray
from data.prepared import PreparedStore, prepare
from data.synthetic import chest_image
from data.transforms import IMAGENET, build_train_transform

SIZE, SCALE = 224, (0.5, 1.0)
# the training path's own rule for the smallest decode every crop can use
DRAFT_MIN_SIDE = draft_min_side(argparse.Namespace(jpeg_draft=True, input_size=SIZE, random_resize_range=SCALE))
KINDS = {"390x320 JPEG": ((320, 390), ".jpg"), "2828x2320 JPEG": ((2320, 2828), ".jpg"),
         "1024x1024 PNG": ((1024, 1024), ".png")}


def make_files(folder: str, per_kind: int = 4) -> dict[str, list[str]]:
    files = {}
    for kind, ((h, w), ext) in KINDS.items():
        files[kind] = []
        for i in range(per_kind):
            path = os.path.join(folder, f"{kind.split()[0]}_{i}{ext}")
            Image.fromarray(chest_image(h, w, seed=i)).save(path, **({"quality": 95} if ext == ".jpg" else {}))
            files[kind].append(path)
    return files


def reference_pipeline():
    transform = transforms.Compose([
        transforms.RandomResizedCrop(SIZE, scale=SCALE, interpolation=InterpolationMode.BICUBIC),
        transforms.RandomHorizontalFlip(), transforms.ToTensor(), transforms.Normalize(*IMAGENET)])
    return lambda path: transform(Image.open(path).convert("RGB"))


def ours_pipeline(draft: bool):
    transform = build_train_transform(SIZE, SCALE, *IMAGENET, in_chans=3)
    min_side = DRAFT_MIN_SIDE if draft else None
    return lambda path: transform(load_gray(path, min_side))


def prepared_pipeline(store: PreparedStore, rows: dict[str, int]):
    transform = build_train_transform(SIZE, SCALE, *IMAGENET, in_chans=3)
    return lambda path: transform(store.image(rows[path]))


def decode_alone(path):
    with Image.open(path) as im:
        im.load()


def decode_alone_draft(path):
    """The ceiling of any reduced-scale pipeline: the draft decode with nothing after it."""
    load_gray(path, DRAFT_MIN_SIDE)


def decode_alone_eighth(path):
    """The speed limit of DCT scaling itself: libjpeg's smallest scale, 1/8, whatever the crop needs."""
    with Image.open(path) as im:
        im.draft(im.mode, (im.width // 8, im.height // 8))
        im.load()


def rate(fn, paths, seconds: float) -> float:
    fn(paths[0])  # warm-up
    n, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        fn(paths[n % len(paths)])
        n += 1
    return n / (time.perf_counter() - start)


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2)
    return float("inf") if mse == 0 else 10 * np.log10(255.0**2 / mse)


def draft_psnr(path: str) -> tuple[float, tuple[int, int]]:
    """Draft decode vs full decode downscaled to the same size (both area-resampled)."""
    draft = load_gray(path, DRAFT_MIN_SIDE)
    full = load_gray(path).resize(draft.size, Image.BOX)
    return psnr(np.asarray(draft), np.asarray(full)), draft.size


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=float, default=3.0, help="time per measurement (default: 3)")
    parser.add_argument("--repeats", type=int, default=3, help="measurements per pipeline, median taken (default: 3)")
    args = parser.parse_args()
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as tmp:
        files = make_files(tmp)
        from data.base import SourceIndex

        every = [p for ps in files.values() for p in ps]
        index = SourceIndex("bench", tmp, every, every, [""] * len(every))
        prepare([index], os.path.join(tmp, "prepared"), size=320, workers=1)
        store = PreparedStore(os.path.join(tmp, "prepared"))
        rows = {p: i for i, p in enumerate(store.columns["path"])}
        pipelines = {"decode alone": decode_alone, "decode alone, draft": decode_alone_draft,
                     "decode alone, 1/8": decode_alone_eighth,
                     "reference": reference_pipeline(),
                     "ours": ours_pipeline(draft=False), "ours --jpeg_draft": ours_pipeline(draft=True),
                     "ours --prepared_dir": prepared_pipeline(store, rows)}
        print(f"torch {torch.__version__}, 1 thread, {args.repeats} x {args.seconds:.0f} s per cell, medians\n")
        print(f"{'pipeline':24s}" + "".join(f"{k:>22s}" for k in KINDS))
        results = {}
        for name, fn in pipelines.items():
            results[name] = {k: statistics.median(rate(fn, files[k], args.seconds) for _ in range(args.repeats))
                             for k in KINDS}
            print(f"{name:24s}" + "".join(f"{results[name][k]:>16.1f} img/s" for k in KINDS), flush=True)
        print("\nratio to the reference pipeline (same run)")
        for name in pipelines:
            if name not in ("reference",):
                print(f"{name:24s}" + "".join(f"{results[name][k] / results['reference'][k]:>21.2f}x" for k in KINDS))
        print("\nreduced-scale JPEG decode vs full decode (same output size)")
        for kind in ("390x320 JPEG", "2828x2320 JPEG"):
            value, size = draft_psnr(files[kind][0])
            print(f"  {kind}: decoded at {size[0]}x{size[1]}, PSNR {value:.1f} dB")


if __name__ == "__main__":
    main()
