"""The filters that choose a source's images: views (--views) and the seeded caps and weights (--source_cap,
--source_weight). Each records what it removed on the index (SourceIndex.select), for the count tree."""
import numpy as np

from data.base import Source, SourceIndex


def view_filter(idx: SourceIndex, source: Source, requested: str | None) -> None:
    views = requested.split(",") if requested else list(source.default_views)
    if not views or views == ["all"]:
        return
    if views == ["frontal"]:
        idx.select(idx.views != b"Lateral", "frontal views")
        return
    idx.select(np.isin(idx.views, np.array(views, dtype=np.bytes_)), f"views {','.join(views)}")


def resample(idx: SourceIndex, cap: str | None, weight: str | None, seed: int) -> None:
    """A fixed random subset (cap) or resampling to weight x size; seeded so every rank agrees."""
    rng = np.random.default_rng(seed)
    if cap is not None and int(cap) < len(idx):
        idx.select(np.sort(rng.choice(len(idx), int(cap), replace=False)), f"cap {cap}")
    if weight is not None and float(weight) != 1.0:
        # every image floor(w) times, plus a random subset for the fractional part
        n, whole = len(idx), int(float(weight))
        extra = rng.choice(n, round((float(weight) - whole) * n), replace=False)
        chosen = np.concatenate([np.tile(np.arange(n), whole), extra])
        idx.select(np.sort(chosen) if len(chosen) else np.arange(min(n, 1)), f"weight {weight}")
