"""Pictures of a run: reconstruction grids (original | masked | reconstruction | reconstruction + visible patches),
per-epoch curves from log.txt, and fine-tuning's ROC curves (matplotlib, Agg backend).

Panels are shown in the run's own normalisation, de-normalised to [0, 1]. With norm_pix_loss the
model predicts per-patch normalised pixels; those panels are mapped back with the ground-truth
patch mean/variance and labelled as such, since that uses information the model never saw.
"""
import os

import numpy as np
import torch
from PIL import Image, ImageDraw

from util.masking import patchify, unpatchify


@torch.no_grad()
def reconstruct(model, images: torch.Tensor, mask_ratio: float, mask_seed: int):
    """(loss, panels [N, 4, C, H, W] in normalised units). The mask RNG is forked, so training RNG is untouched."""
    devices = [images.device] if images.device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(mask_seed)
        loss, pred, mask = model(images, mask_ratio=mask_ratio)
    p, c = model.patch_size, model.in_chans
    pred = pred.float()
    if pred.ndim == 4:  # the CNN returns the reconstructed image (as the reference does), the ViT its patches
        pred = patchify(pred, p)
    if model.norm_pix_loss:
        target = patchify(images.float(), p)
        mean, var = target.mean(dim=-1, keepdim=True), target.var(dim=-1, keepdim=True)
        pred = pred * (var + 1.0e-6) ** 0.5 + mean
    mask_img = unpatchify(mask.unsqueeze(-1).repeat(1, 1, p * p * c), p, c, _grid(images, p))
    recon = unpatchify(pred, p, c, _grid(images, p))
    masked = images * (1 - mask_img)
    pasted = images * (1 - mask_img) + recon * mask_img
    return float(loss), torch.stack([images, masked, recon, pasted], dim=1)


def _grid(images: torch.Tensor, p: int) -> tuple[int, int]:
    return images.shape[-2] // p, images.shape[-1] // p


def panels_to_uint8(panels: torch.Tensor, mean, std) -> np.ndarray:
    """[N, 4, C, H, W] normalised -> [N*H, 4*W] uint8 gray mosaic (channel mean)."""
    mean_t = torch.tensor(mean, dtype=panels.dtype).view(1, 1, -1, 1, 1)
    std_t = torch.tensor(std, dtype=panels.dtype).view(1, 1, -1, 1, 1)
    pix = (panels.cpu() * std_t + mean_t).clamp(0, 1).mean(dim=2)  # [N, 4, H, W]
    n, k, h, w = pix.shape
    mosaic = pix.permute(0, 2, 1, 3).reshape(n * h, k * w)
    return (mosaic.numpy() * 255 + 0.5).astype(np.uint8)


def titled_grid(mosaic: np.ndarray, norm_pix_loss: bool, title: str) -> Image.Image:
    labels = ["original", "masked", "reconstruction", "recon + visible"]
    if norm_pix_loss:
        labels[2] += "*"
        labels[3] += "*"
    panel_w = mosaic.shape[1] // 4
    scale = max(1, 160 // max(panel_w, 1))
    body = Image.fromarray(mosaic).resize((mosaic.shape[1] * scale, mosaic.shape[0] * scale), Image.NEAREST)
    header = 30 if not norm_pix_loss else 44
    canvas = Image.new("L", (body.width, body.height + header), 255)
    canvas.paste(body, (0, header))
    draw = ImageDraw.Draw(canvas)
    draw.text((4, 2), title, fill=0)
    for i, label in enumerate(labels):
        draw.text((i * panel_w * scale + 4, 16), label, fill=0)
    if norm_pix_loss:
        draw.text((4, 30), "* norm_pix_loss: de-normalised with ground-truth patch mean/var (display only)", fill=0)
    return canvas


def save_reconstruction_png(path: str, model, images, mask_ratio, mask_seed, mean, std,
                            title: str) -> tuple[float, Image.Image]:
    """Write the grid to `path`; returns the loss and the grid (for TensorBoard, without reading the file back)."""
    loss, panels = reconstruct(model, images, mask_ratio, mask_seed)
    image = titled_grid(panels_to_uint8(panels, mean, std), model.norm_pix_loss, f"{title}  loss {loss:.4f}")
    tmp = f"{path}.tmp.{os.getpid()}"
    image.save(tmp, format="PNG")
    os.replace(tmp, path)  # atomic: a kill never leaves half a picture
    return loss, image


def _pyplot():
    """matplotlib's pyplot on the Agg backend: files only, no display needed (cluster nodes have none)."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    return plt


def save_figure(fig, path: str) -> None:
    """fig as a PNG at `path`, atomically: a reader (or a rerun after a kill) never finds half a file."""
    tmp = f"{path}.tmp.{os.getpid()}"
    fig.savefig(tmp, format="png")
    os.replace(tmp, path)


def save_loss_curve(log_txt: str, path: str, keys=("train_loss", "val_loss"), ylabel: str = "loss") -> None:
    """Plot per-epoch series from log.txt (matplotlib, Agg backend: no display needed)."""
    import json

    plt = _pyplot()
    from matplotlib.ticker import MaxNLocator

    with open(log_txt, encoding="utf-8") as f:
        rows = [json.loads(line) for line in f if line.strip()]
    series = {k: [(r["epoch"], r[k]) for r in rows if isinstance(r.get(k), (int, float))] for k in keys}
    series = {k: v for k, v in series.items() if v}
    if not series:
        return
    fig, ax = plt.subplots(figsize=(6, 3.6), dpi=100)
    for key, points in series.items():
        ax.plot([e for e, _ in points], [y for _, y in points], marker="o", markersize=3, label=key)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))  # epochs are whole numbers
    ax.set_xlabel("epoch")
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    save_figure(fig, path)
    plt.close(fig)


def roc_path(out_dir: str, finding: str) -> str:
    return os.path.join(out_dir, f"roc_{finding.replace(' ', '_')}.png")


def save_roc_curves(scores: np.ndarray, labels: np.ndarray, findings: list[str], aurocs: list, out_dir: str,
                    title: str) -> list[str]:
    """One ROC-curve PNG per finding (scikit-learn's roc_curve), roc_<finding>.png in out_dir; returns the paths.
    Findings with a single class in `labels` have no curve and are skipped."""
    from sklearn.metrics import roc_curve

    plt = _pyplot()
    os.makedirs(out_dir, exist_ok=True)
    paths = []
    for k, name in enumerate(findings):
        if aurocs[k] is None:
            continue
        fpr, tpr, _ = roc_curve(labels[:, k] > 0.5, scores[:, k])
        fig, ax = plt.subplots(figsize=(4, 4), dpi=100)
        ax.plot(fpr, tpr, label=f"AUROC {aurocs[k]:.3f}")
        ax.plot([0, 1], [0, 1], linestyle="--", color="grey", linewidth=0.8)
        ax.set_xlabel("false positive rate")
        ax.set_ylabel("true positive rate")
        ax.set_title(f"{name}\n{title}", fontsize=9)
        ax.legend(loc="lower right")
        fig.tight_layout()
        path = roc_path(out_dir, name)
        save_figure(fig, path)
        plt.close(fig)
        paths.append(path)
    return paths


def save_confusion_matrix(matrix, class_names: list[str], path: str, title: str) -> None:
    """The confusion matrix as a picture (rows: true class, columns: predicted), each cell with its count and its
    share of the row, so a reader sees both the numbers and which classes are confused."""
    plt = _pyplot()
    matrix = np.asarray(matrix)
    rows = matrix.sum(axis=1, keepdims=True)
    shares = np.divide(matrix, rows, out=np.zeros(matrix.shape, dtype=float), where=rows > 0)
    fig, ax = plt.subplots(figsize=(1.4 * len(class_names) + 1.5, 1.2 * len(class_names) + 1.2), dpi=100)
    ax.imshow(shares, cmap="Blues", vmin=0, vmax=1)
    for i in range(matrix.shape[0]):
        for j in range(matrix.shape[1]):
            ax.text(j, i, f"{matrix[i, j]}\n{shares[i, j]:.0%}", ha="center", va="center",
                    color="white" if shares[i, j] > 0.5 else "black", fontsize=9)
    ax.set_xticks(range(len(class_names)), class_names, rotation=30, ha="right")
    ax.set_yticks(range(len(class_names)), class_names)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(title, fontsize=9)
    fig.tight_layout()
    save_figure(fig, path)
    plt.close(fig)


def save_segmentation_overlays(cases: list[dict], path: str, title: str) -> None:
    """One panel per case: the image in gray, the true mask's outline in green and the prediction filled in red.
    Each case: {'image': [H, W] uint8, 'truth': [H, W] bool, 'predicted': [H, W] bool, 'label': str}."""
    plt = _pyplot()
    columns = min(4, len(cases))
    rows = (len(cases) + columns - 1) // columns
    fig, axes = plt.subplots(rows, columns, figsize=(3 * columns, 3.3 * rows), dpi=100, squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for ax, case in zip(axes.flat, cases):
        ax.imshow(case["image"], cmap="gray", vmin=0, vmax=255)
        red = np.zeros((*case["predicted"].shape, 4))
        red[case["predicted"]] = (1.0, 0.1, 0.1, 0.4)
        ax.imshow(red)
        if case["truth"].any():
            ax.contour(case["truth"].astype(float), levels=[0.5], colors="lime", linewidths=1.2)
        ax.set_title(case["label"], fontsize=8)
    fig.suptitle(f"{title}\ngreen: true mask outline, red: prediction", fontsize=9)
    fig.tight_layout()
    save_figure(fig, path)
    plt.close(fig)
