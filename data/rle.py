"""Run-length encoding of binary masks in the SIIM-ACR Pneumothorax convention (train-rle.csv's EncodedPixels).

The mask's pixels are read column by column (the image transposed, then flattened). EncodedPixels is a list of
"gap length" pairs: each gap counts the pixels from the end of the previous run (from pixel 0 for the first) to the
start of this run. "-1" is an empty mask. An image with several pneumothorax regions has one row per region;
decode_rows merges them.
"""
import numpy as np

EMPTY = "-1"


class RLEError(ValueError):
    """An EncodedPixels string that is not a valid mask of the given size."""


def decode(encoded: str, height: int, width: int) -> np.ndarray:
    """One EncodedPixels string -> bool mask [height, width]. RLEError on odd counts, negative numbers or a run that
    goes past the image."""
    text = encoded.strip()
    flat = np.zeros(height * width, dtype=bool)
    if text == EMPTY or not text:
        return flat.reshape(width, height).T
    try:
        numbers = np.array([int(v) for v in text.split()], dtype=np.int64)
    except ValueError as e:
        raise RLEError(f"EncodedPixels holds a value that is not an integer ({e})") from e
    if len(numbers) % 2:
        raise RLEError(f"EncodedPixels has {len(numbers)} numbers; it must be gap/length pairs")
    if (numbers < 0).any() or (numbers[1::2] == 0).any():
        raise RLEError("EncodedPixels has a negative gap or an empty run")
    gaps, lengths = numbers[0::2], numbers[1::2]
    ends = np.cumsum(gaps + lengths)  # one past each run's last pixel
    starts = ends - lengths
    if ends[-1] > flat.size:
        raise RLEError(f"EncodedPixels runs to pixel {int(ends[-1])}, past the {height}x{width} image "
                       f"({flat.size} pixels)")
    for start, end in zip(starts, ends):
        flat[start:end] = True
    return flat.reshape(width, height).T


def decode_rows(rows: list[str], height: int, width: int) -> np.ndarray:
    """The union of an image's EncodedPixels rows (one per region); empty for ["-1"]."""
    mask = np.zeros((height, width), dtype=bool)
    for encoded in rows:
        mask |= decode(encoded, height, width)
    return mask


def encode(mask: np.ndarray) -> str:
    """bool/0-1 mask [H, W] -> EncodedPixels ("-1" when empty); decode(encode(m), H, W) == m."""
    flat = np.asarray(mask, dtype=bool).T.reshape(-1)
    padded = np.concatenate([[False], flat, [False]])
    edges = np.flatnonzero(padded[1:] != padded[:-1])
    if not len(edges):
        return EMPTY
    starts, ends = edges[0::2], edges[1::2]
    gaps = starts - np.concatenate([[0], ends[:-1]])
    return " ".join(f"{g} {n}" for g, n in zip(gaps, ends - starts))
