"""Any chest X-ray file -> one 8-bit grayscale PIL image.

8-bit files (CheXpert, MIMIC, most NIH) are only made single-channel. 16-bit PNGs are scaled per
image by a percentile window, never clipped (PIL's convert('L') clips them to white). DICOM goes
through the modality LUT, then the VOI LUT or window, then MONOCHROME1 inversion, in that order.
MetaImage files (.mha/.mhd, as NODE21 ships its radiographs) are read with SimpleITK and windowed
like 16-bit PNGs.
The type is detected by content and extension, never by the dataset it came from.
"""
import numpy as np
from PIL import Image

DICOM_EXTENSIONS = (".dcm", ".dicom")
METAIMAGE_EXTENSIONS = (".mha", ".mhd")
_SIXTEEN_BIT_MODES = ("I;16", "I;16B", "I;16L", "I;16N", "I", "F")


class ImageDecodeError(RuntimeError):
    """A listed image exists but could not be decoded; the message names the file."""


def to_uint8(a: np.ndarray, lo_pct: float = 0.5, hi_pct: float = 99.5, invert: bool = False) -> np.ndarray:
    """Percentile window to [0, 255]; robust to burned-in text and unknown bit depth."""
    a = a.astype(np.float32)
    lo, hi = np.percentile(a, [lo_pct, hi_pct])
    a = np.clip((a - lo) / max(hi - lo, 1e-6), 0.0, 1.0)
    if invert:
        a = 1.0 - a
    return (a * 255.0 + 0.5).astype(np.uint8)


def is_dicom(path: str) -> bool:
    if path.lower().endswith(DICOM_EXTENSIONS):
        return True
    with open(path, "rb") as f:
        head = f.read(132)
    return len(head) == 132 and head[128:132] == b"DICM"


def _pil_to_gray(im: Image.Image) -> Image.Image:
    if im.mode == "L":
        return im
    if im.mode in _SIXTEEN_BIT_MODES:
        return Image.fromarray(to_uint8(np.asarray(im)))
    if im.mode in ("LA", "RGBA", "RGB", "P", "PA", "CMYK", "YCbCr", "1"):
        return im.convert("L")
    raise ImageDecodeError(f"unexpected PIL mode {im.mode}")


def _reduced_draft(im: Image.Image, min_side: int | None) -> None:
    """Let libjpeg decode at 1/2, 1/4 or 1/8 scale while the shorter side stays >= min_side."""
    if min_side and im.format == "JPEG":
        w, h = im.size
        scale = max(min_side / min(w, h), 1e-6)
        im.draft("L", (int(w * scale + 0.999), int(h * scale + 0.999)))


def load_gray(path: str, min_side: int | None = None) -> Image.Image:
    """Decode `path` to a PIL 'L' image. min_side enables reduced-scale JPEG decoding (never below it)."""
    try:
        if is_dicom(path):
            return Image.fromarray(load_dicom(path))
        if path.lower().endswith(METAIMAGE_EXTENSIONS):
            return Image.fromarray(load_metaimage(path))
        with Image.open(path) as im:
            _reduced_draft(im, min_side)
            im.load()
            return _pil_to_gray(im)
    except FileNotFoundError as e:
        raise FileNotFoundError(f"image listed in the metadata is missing: {path}") from e
    except ImageDecodeError as e:
        raise ImageDecodeError(f"{path}: {e}") from e
    except Exception as e:  # corrupt bytes surface as struct.error, zlib.error, EOFError, ... from the decoders
        raise ImageDecodeError(f"could not decode {path}: {e}") from e


def load_dicom(path: str) -> np.ndarray:
    import pydicom
    from pydicom.pixels import apply_modality_lut, apply_voi_lut
    from pydicom.uid import ImplicitVRLittleEndian

    ds = pydicom.dcmread(path, force=True)
    if "PixelData" not in ds:
        raise ImageDecodeError("the DICOM has no PixelData")
    if not hasattr(ds, "file_meta") or "TransferSyntaxUID" not in ds.file_meta:
        # Some VinDr files lack file meta (vindr-cxr issue #3); their pixels are uncompressed.
        ds.file_meta = getattr(ds, "file_meta", pydicom.dataset.FileMetaDataset())
        ds.file_meta.TransferSyntaxUID = ImplicitVRLittleEndian
    photometric = str(ds.get("PhotometricInterpretation", "MONOCHROME2")).upper()
    if photometric not in ("MONOCHROME1", "MONOCHROME2"):
        raise ImageDecodeError(f"PhotometricInterpretation {photometric} is not a grayscale radiograph")
    pixels = apply_modality_lut(ds.pixel_array, ds)
    if "WindowCenter" in ds or "VOILUTSequence" in ds:
        pixels = apply_voi_lut(pixels, ds)
    invert = photometric == "MONOCHROME1" or str(ds.get("PresentationLUTShape", "")).upper() == "INVERSE"
    return to_uint8(pixels, invert=invert)


def load_metaimage(path: str) -> np.ndarray:
    """A 2-D MetaImage (one slice, one component), windowed to 8 bits."""
    import os

    import SimpleITK as sitk

    if not os.path.exists(path):  # SimpleITK reports a missing file as a generic RuntimeError
        raise FileNotFoundError(path)
    pixels = sitk.GetArrayFromImage(sitk.ReadImage(path))
    if pixels.ndim == 3 and pixels.shape[0] == 1:  # a 2-D image stored as one slice
        pixels = pixels[0]
    if pixels.ndim != 2:
        raise ImageDecodeError(f"MetaImage of shape {list(pixels.shape)}: expected one 2-D grayscale radiograph")
    return to_uint8(pixels)


def decode_problem(path: str) -> str | None:
    """None if `path` decodes completely, else what is wrong with it (for checks and reports)."""
    try:
        load_gray(path)
    except FileNotFoundError:
        return "missing"
    except ImageDecodeError as e:
        return str(e.__cause__ or e)
    return None
