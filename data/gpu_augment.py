"""--gpu_augment: RandomResizedCrop + flip + normalise as one batched operation on the training device.

Workers only place each gray image on a fixed uint8 canvas (CanvasTransform), so they copy bytes. The crop
parameters are drawn per sample with torchvision's RandomResizedCrop rule (10 tries of area ~ U(scale) and
log-aspect ~ U(log ratio), else a centre crop), vectorised, from a generator seeded by (seed, epoch, step, rank),
so a resumed run draws the same crops. Resampling is bicubic grid_sample without antialiasing, unlike PIL.

Only the uniform draws are made on the CPU (a CPU generator gives the same numbers on every device and torch
version); they go to the device in one copy from pinned memory that does not block, and the crop rule, the affine
matrices and the resampling run there. Nothing in a step waits for the host.
"""
import math

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

RATIO = (3.0 / 4.0, 4.0 / 3.0)


class CanvasTransform:
    """Gray PIL image -> (uint8 [1, C, C] with the image top-left, (h, w), source id).

    Beyond the image the canvas repeats its last row and column, so the bicubic taps of a crop that touches the
    right or bottom border read image values (as PIL's resampling does), never a zero fill."""

    def __init__(self, canvas: int, source_id: int):
        self.canvas, self.source_id = canvas, source_id

    def __call__(self, image: Image.Image):
        w, h = image.size
        if max(w, h) > self.canvas:  # rare with prepared data; keeps the aspect ratio
            scale = self.canvas / max(w, h)
            image = image.resize((max(1, round(w * scale)), max(1, round(h * scale))), Image.BICUBIC)
            w, h = image.size
        pixels = np.pad(np.asarray(image, dtype=np.uint8), ((0, self.canvas - h), (0, self.canvas - w)), mode="edge")
        return torch.from_numpy(pixels).unsqueeze(0), torch.tensor([h, w]), self.source_id


def draw_uniforms(n: int, generator: torch.Generator) -> torch.Tensor:
    """[N, 23] float64 U(0, 1) draws for N crops, in torchvision's order: 10 areas, 10 log-aspects, 2 positions, then
    the flip. One tensor, so it travels to the device in one copy."""
    return torch.rand(n, 23, dtype=torch.float64, generator=generator)


def sample_crops(hw: torch.Tensor, scale, uniforms: torch.Tensor, ratio=RATIO) -> torch.Tensor:
    """[N, 4] crops (top, left, height, width) drawn like RandomResizedCrop.get_params, for images of size hw, from
    draw_uniforms' numbers (on any device: the result is on theirs)."""
    tries = 10
    hw = hw.to(uniforms.device, non_blocking=True)
    height, width = hw[:, :1].double(), hw[:, 1:].double()
    area = height * width
    target = area * (scale[0] + (scale[1] - scale[0]) * uniforms[:, :tries])
    lo, hi = math.log(ratio[0]), math.log(ratio[1])
    aspect = torch.exp(lo + (hi - lo) * uniforms[:, tries:2 * tries])
    w = torch.round(torch.sqrt(target * aspect))
    h = torch.round(torch.sqrt(target / aspect))
    ok = (w > 0) & (h > 0) & (w <= width) & (h <= height)
    first = torch.argmax(ok.int(), dim=1, keepdim=True)  # first successful try per sample
    found = ok.gather(1, first).squeeze(1)
    h, w = h.gather(1, first).squeeze(1), w.gather(1, first).squeeze(1)
    u = uniforms[:, 2 * tries:2 * tries + 2]
    top = torch.floor(u[:, 0] * (height.squeeze(1) - h + 1))
    left = torch.floor(u[:, 1] * (width.squeeze(1) - w + 1))
    # fallback: the largest centre crop whose aspect ratio lies in `ratio`
    in_ratio = width.squeeze(1) / height.squeeze(1)
    fw = torch.where(in_ratio < ratio[0], width.squeeze(1),
                     torch.where(in_ratio > ratio[1], torch.round(height.squeeze(1) * ratio[1]), width.squeeze(1)))
    fh = torch.where(in_ratio < ratio[0], torch.round(width.squeeze(1) / ratio[0]), height.squeeze(1))
    top = torch.where(found, top, torch.floor((height.squeeze(1) - fh) / 2))
    left = torch.where(found, left, torch.floor((width.squeeze(1) - fw) / 2))
    return torch.stack([top, left, torch.where(found, h, fh), torch.where(found, w, fw)], dim=1)


class BatchAugment:
    """uint8 canvases [N, 1, C, C] -> normalised crops [N, in_chans, S, S] on the canvases' device."""

    def __init__(self, input_size: int, scale, per_source_stats: list, in_chans: int):
        self.size, self.scale, self.in_chans = input_size, tuple(scale or (1.0, 1.0)), in_chans
        # (x / 255 - mean) / std as x * a + b, one row per source
        self.a = torch.tensor([[1.0 / (255.0 * s) for s in std] for _, std in per_source_stats])
        self.b = torch.tensor([[-m / s for m, s in zip(mean, std)] for mean, std in per_source_stats])
        self._on_device: dict = {}  # device -> (a, b): constants copied to the device once, not every step

    def _constants(self, device: torch.device):
        if device not in self._on_device:
            self._on_device[device] = (self.a.to(device), self.b.to(device))
        return self._on_device[device]

    def __call__(self, canvas: torch.Tensor, hw: torch.Tensor, source: torch.Tensor, seed: int) -> torch.Tensor:
        device = canvas.device
        uniforms = draw_uniforms(hw.shape[0], torch.Generator().manual_seed(seed))
        if device.type == "cuda":  # pinned, so the copy below is asynchronous
            uniforms = uniforms.pin_memory()
        uniforms = uniforms.to(device, non_blocking=True)
        crops = sample_crops(hw, self.scale, uniforms).float()
        flip = uniforms[:, -1] < 0.5
        n, _, ch, cw = canvas.shape
        top, left, h, w = crops.unbind(1)
        theta = torch.zeros(n, 2, 3, device=device)
        theta[:, 0, 0] = torch.where(flip, -w, w) / cw
        theta[:, 0, 2] = (2 * left + w) / cw - 1
        theta[:, 1, 1] = h / ch
        theta[:, 1, 2] = (2 * top + h) / ch - 1
        grid = F.affine_grid(theta, [n, 1, self.size, self.size], align_corners=False)
        pixels = F.grid_sample(canvas.float(), grid, mode="bicubic", padding_mode="border", align_corners=False)
        pixels = pixels.clamp_(0, 255)
        a_rows, b_rows = self._constants(device)
        source = source.to(device, non_blocking=True)
        a, b = a_rows[source].view(n, -1, 1, 1), b_rows[source].view(n, -1, 1, 1)
        return pixels * a + b  # broadcasts the gray plane to in_chans channels
