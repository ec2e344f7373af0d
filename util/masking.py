"""Patchify/unpatchify for any channel count and the reference's per-sample random masking.

Both models share these so the masking rule (noise = torch.rand(N, L), argsort, keep the lowest)
is written once.
"""
import torch


def patchify(imgs: torch.Tensor, p: int) -> torch.Tensor:
    """[N, C, H, W] -> [N, L, p*p*C], patches in row-major order, pixels ordered (p, q, c) as in MAE."""
    n, c, h, w = imgs.shape
    if h % p or w % p:
        raise ValueError(f"image size {h}x{w} is not divisible by the patch size {p}")
    gh, gw = h // p, w // p
    x = imgs.reshape(n, c, gh, p, gw, p)
    x = torch.einsum("nchpwq->nhwpqc", x)
    return x.reshape(n, gh * gw, p * p * c)


def unpatchify(x: torch.Tensor, p: int, in_chans: int, grid_size: tuple[int, int] | None = None) -> torch.Tensor:
    """[N, L, p*p*C] -> [N, C, H, W]; a square grid unless grid_size=(gh, gw) is given."""
    n, num_patches, _ = x.shape
    if grid_size is None:
        side = int(round(num_patches**0.5))
        if side * side != num_patches:
            raise ValueError(f"{num_patches} patches do not form a square grid; pass grid_size")
        grid_size = (side, side)
    gh, gw = grid_size
    x = x.reshape(n, gh, gw, p, p, in_chans)
    x = torch.einsum("nhwpqc->nchpwq", x)
    return x.reshape(n, in_chans, gh * p, gw * p)


def kept_patches(num_patches: int, mask_ratio: float) -> int:
    """How many of the image's patches stay visible: the reference's int(L*(1-r))."""
    return int(num_patches * (1 - mask_ratio))


def random_masking_ids(n: int, num_patches: int, mask_ratio: float, device) -> tuple[torch.Tensor, torch.Tensor, int]:
    """The reference rule: one torch.rand(N, L) on `device`, argsort, keep the int(L*(1-r)) lowest.

    Returns ids_shuffle [N, L], ids_restore [N, L] and len_keep. Drawing the noise here, in one call
    of the same shape and device as the reference, keeps masks identical for a given RNG state.
    """
    len_keep = kept_patches(num_patches, mask_ratio)
    noise = torch.rand(n, num_patches, device=device)  # noise in [0, 1)
    ids_shuffle = torch.argsort(noise, dim=1)  # ascend: small is keep, large is remove
    ids_restore = torch.argsort(ids_shuffle, dim=1)
    return ids_shuffle, ids_restore, len_keep


def binary_mask(ids_restore: torch.Tensor, len_keep: int) -> torch.Tensor:
    """[N, L] mask in the original patch order: 0 is kept, 1 is removed."""
    n, num_patches = ids_restore.shape
    mask = torch.ones(n, num_patches, device=ids_restore.device)
    mask[:, :len_keep] = 0
    return torch.gather(mask, dim=1, index=ids_restore)


def check_mask_ratio(mask_ratio: float) -> None:
    if not 0.0 <= mask_ratio < 1.0:
        raise ValueError(f"mask_ratio is the fraction of patches removed and must be in [0, 1), got {mask_ratio}")


def no_patch_removed(num_patches: int, mask_ratio: float) -> str | None:
    """A loss averaged over the removed patches is 0/0 (NaN at every step) when --mask_ratio removes none of the
    image's patches: the problem, for the start-up checks, or None."""
    if kept_patches(num_patches, mask_ratio) < num_patches:
        return None
    return (f"--mask_ratio {mask_ratio} removes none of the {num_patches} patches, and the loss is the mean over the "
            "removed ones (NaN at every step); pass a larger --mask_ratio (the reference's 0.75, the paper's 0.9)")


def normalize_patch_targets(target: torch.Tensor) -> torch.Tensor:
    """norm_pix_loss targets: each patch normalised by its own mean and variance (MAE's rule)."""
    mean = target.mean(dim=-1, keepdim=True)
    var = target.var(dim=-1, keepdim=True)
    return (target - mean) / (var + 1.0e-6) ** 0.5
