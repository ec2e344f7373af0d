"""Perceptual hashes of radiographs, and a Hamming-distance index over them (tools/find_duplicates.py).

The hash is a 256-bit DCT hash: the image decoded to 8-bit gray as training reads it (data/image_io.py: 16-bit and
DICOM windowed), resized to 64 x 64 with antialiasing, its 2-D DCT (scipy), the 16 x 16 lowest frequencies but the
constant one, each bit set where the coefficient is above their median. Resizing, re-encoding (PNG, JPEG, DICOM) and
bit depth move a copy by a few bits (tests/tools/test_find_duplicates.py plants such copies); different images differ in
about 90.

The index cuts each hash into 16 chunks of 16 bits. Two hashes within 15 bits of each other agree exactly on at least
one chunk (16 chunks, at most 15 differing bits), so a query looks up its 16 chunks in 16 sorted tables and measures
only those candidates instead of the whole pool.
"""
import numpy as np
from PIL import Image
from scipy.fft import dctn

from data.image_io import load_gray

BITS = 256
CHUNKS = 16
MAX_INDEXED_DISTANCE = CHUNKS - 1  # what the chunk lookup is guaranteed to find
_POPCOUNT = np.array([bin(v).count("1") for v in range(256)], dtype=np.uint16)


def phash(image: Image.Image) -> np.ndarray:
    """uint8 [32]: the 256-bit hash (the first bit, the constant frequency's place, always 0)."""
    pixels = np.asarray(image.convert("L").resize((64, 64), Image.LANCZOS), dtype=np.float64)
    low = dctn(pixels, norm="ortho")[:16, :16].ravel()
    bits = low > np.median(low[1:])
    bits[0] = False
    return np.packbits(bits)


def phash_file(path: str) -> np.ndarray:
    return phash(load_gray(path))


def hamming(hashes: np.ndarray, query: np.ndarray) -> np.ndarray:
    """Bits that differ between each row of hashes [N, 32] and query [32]."""
    return _POPCOUNT[np.bitwise_xor(hashes, query)].sum(axis=1)


class HashIndex:
    """Multi-index hashing over a pool's hashes [N, 32]: near(query, d) for d <= MAX_INDEXED_DISTANCE."""

    def __init__(self, hashes: np.ndarray):
        self.hashes = np.ascontiguousarray(hashes, dtype=np.uint8)
        chunks = self.hashes.view(">u2")  # [N, 16] big-endian 16-bit chunks
        self.tables = []
        for c in range(CHUNKS):
            order = np.argsort(chunks[:, c], kind="stable")
            self.tables.append((chunks[order, c], order))

    def near(self, query: np.ndarray, max_distance: int) -> tuple[np.ndarray, np.ndarray]:
        """(pool rows, distances) of the hashes within max_distance bits of query, by row."""
        if max_distance > MAX_INDEXED_DISTANCE:
            raise ValueError(f"the index finds distances up to {MAX_INDEXED_DISTANCE}, asked {max_distance}")
        keys = np.ascontiguousarray(query, dtype=np.uint8).view(">u2")
        candidates = []
        for c, (sorted_keys, order) in enumerate(self.tables):
            lo, hi = np.searchsorted(sorted_keys, keys[c], "left"), np.searchsorted(sorted_keys, keys[c], "right")
            candidates.append(order[lo:hi])
        rows = np.unique(np.concatenate(candidates))
        distance = hamming(self.hashes[rows], query)
        keep = distance <= max_distance
        return rows[keep], distance[keep]
