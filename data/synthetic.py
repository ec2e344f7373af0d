"""Miniature chest X-ray datasets in the real on-disk layouts (see shared docs/datasets.md).

Images look like radiographs (body outline, dark lungs, heart, spine, ribs, noise), so a demo run
reconstructs something recognisable. IDs are synthetic. Each builder returns the number of images
its source should select for pre-training, so tests can check counts.
"""
import csv
import gzip
import io
import os

import numpy as np
from PIL import Image

CHEXPERT_HEADER = ["Path", "Sex", "Age", "Frontal/Lateral", "AP/PA", "No Finding", "Enlarged Cardiomediastinum",
                   "Cardiomegaly", "Lung Opacity", "Lung Lesion", "Edema", "Consolidation", "Pneumonia",
                   "Atelectasis", "Pneumothorax", "Pleural Effusion", "Pleural Other", "Fracture", "Support Devices"]
NIH_HEADER = ("Image Index,Finding Labels,Follow-up #,Patient ID,Patient Age,Patient Gender,View Position,"
              "OriginalImage[Width,Height],OriginalImagePixelSpacing[x,y]")
MIMIC_META_HEADER = ["dicom_id", "subject_id", "study_id", "PerformedProcedureStepDescription", "ViewPosition", "Rows",
                     "Columns", "StudyDate", "StudyTime", "ProcedureCodeSequence_CodeMeaning",
                     "ViewCodeSequence_CodeMeaning", "PatientOrientationCodeSequence_CodeMeaning"]
MIMIC_LABELS = ["Atelectasis", "Cardiomegaly", "Consolidation", "Edema", "Enlarged Cardiomediastinum", "Fracture",
                "Lung Lesion", "Lung Opacity", "No Finding", "Pleural Effusion", "Pleural Other", "Pneumonia",
                "Pneumothorax", "Support Devices"]
NIH_FINDINGS = ["No Finding", "Effusion|Infiltration", "Pleural_Thickening", "Atelectasis", "Cardiomegaly|Edema"]


def chest_image(height: int, width: int, seed: int, lateral: bool = False) -> np.ndarray:
    """A uint8 frontal (or lateral) radiograph-like image. The anatomy varies with the seed (position and size of
    the body, lungs and heart, the ribs' spacing, a few darker patches), so two seeds are two different images at
    the scale a perceptual hash sees, not the same image with other noise."""
    return chest_image_and_lungs(height, width, seed, lateral)[0]


def chest_image_and_lungs(height: int, width: int, seed: int, lateral: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """chest_image and its lung mask (bool, the two lung fields as drawn; empty for a lateral view)."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width].astype(np.float32)
    y, x = y / height, x / width
    cx = 0.5 + rng.uniform(-0.04, 0.04)
    cy, half_width = 0.55 + rng.uniform(-0.03, 0.03), 0.42 + rng.uniform(-0.05, 0.03)
    img = np.full((height, width), 0.08, np.float32)
    lungs = np.zeros((height, width), dtype=bool)
    body = ((x - cx) / half_width) ** 2 + ((y - cy) / 0.55) ** 2 < 1
    img[body] = 0.55
    if lateral:
        img[((x - cx) / 0.25) ** 2 + ((y - 0.45) / 0.3) ** 2 < 1] = 0.3
    else:
        lung_y, lung_dx = 0.45 + rng.uniform(-0.04, 0.04), 0.17 + rng.uniform(-0.025, 0.025)
        for side in (-1, 1):
            lung = (((x - cx - side * lung_dx) / (0.13 + rng.uniform(-0.025, 0.025))) ** 2
                    + ((y - lung_y) / (0.3 + rng.uniform(-0.05, 0.05))) ** 2 < 1)
            img[lung] = 0.22 + rng.uniform(-0.03, 0.03)
            lungs |= lung
        heart_r = 0.12 + rng.uniform(-0.025, 0.03)
        heart = ((x - cx + 0.05 + rng.uniform(-0.03, 0.03)) / heart_r) ** 2 + ((y - 0.62) / 0.12) ** 2 < 1
        img[heart] = 0.7
        lungs &= ~heart  # the heart is drawn over the lungs
        img[np.abs(x - cx) < 0.035] = 0.8  # spine
        lungs &= np.abs(x - cx) >= 0.035
        spacing, phase = 14 + rng.uniform(-3, 3), rng.uniform(0, 2)
        ribs = 0.08 * (np.sin((y * spacing + phase + 3 * (x - cx) ** 2 * 6) * np.pi) > 0.85)
        img += ribs * body
    for _ in range(3):  # darker patches: vessels, overlying structures
        py, px, r = rng.uniform(0.2, 0.8), rng.uniform(0.2, 0.8), rng.uniform(0.04, 0.09)
        img[((x - px) / r) ** 2 + ((y - py) / r) ** 2 < 1] -= rng.uniform(0.06, 0.12)
    img += rng.normal(0, 0.03, img.shape).astype(np.float32)
    return (np.clip(img, 0, 1) * 255).astype(np.uint8), lungs


def save_image(path: str, pixels: np.ndarray, mode: str = "L") -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    im = Image.fromarray(pixels)
    if mode == "RGBA":
        im = im.convert("RGBA")
    elif mode == "LA":
        im = im.convert("LA")
    elif mode == "I;16":
        im = Image.fromarray(pixels.astype(np.uint16) * 16)  # 12-bit values in a 16-bit PNG
    im.save(path, quality=95) if path.endswith(".jpg") else im.save(path)


def _label_cells(rng, n: int, allow_uncertain: bool = True) -> list[str]:
    values = ["", "1.0", "0.0", "-1.0"] if allow_uncertain else ["", "1.0", "0.0"]
    return [values[i] for i in rng.integers(0, len(values), n)]


def make_chexpert(parent: str, n_patients: int = 6, variant: str = "small", size=(40, 48), seed: int = 0) -> int:
    """CheXpert tree under parent. variant: small | full | aimi. Returns the frontal train count."""
    rng = np.random.default_rng(seed)
    prefix = "CheXpert-v1.0-small" if variant == "small" else "CheXpert-v1.0"
    root = os.path.join(parent, prefix if variant != "aimi" else "chexpertchestxrays-u20210408")
    csv_dir = root if variant != "aimi" else os.path.join(root, "CheXpert-v1.0 batch 1 (validate & csv)")
    rows, frontal = [], 0
    for p in range(1, n_patients + 1):
        views = [("Frontal", "AP"), ("Lateral", "")]
        if p == 1:
            views = [("Lateral", ""), ("Frontal", "PA"), ("Frontal", "LL")]  # first view lateral; 3 views; LL
        for s in range(1, 2 if p % 2 else 3):
            for v, (fl, appa) in enumerate(views, start=1):
                rel = f"train/patient{p:05d}/study{s}/view{v}_{fl.lower()}.jpg"
                sex = "Unknown" if p == 2 else ("Male" if p % 2 else "Female")
                age = "0" if p == 3 else str(40 + p)
                rows.append([f"{prefix}/{rel}", sex, age, fl, appa, *_label_cells(rng, 14)])
                frontal += fl == "Frontal"
                folder = root if variant != "aimi" else os.path.join(
                    root, f"CheXpert-v1.0 batch {2 + p % 3} (train {1 + p % 3})")
                target = os.path.join(folder, rel if variant != "aimi" else rel.split("/", 1)[1])
                save_image(target, chest_image(*size, seed=seed * 1000 + len(rows), lateral=fl == "Lateral"))
    _write_csv(os.path.join(csv_dir, "train.csv"), CHEXPERT_HEADER, rows)
    valid = []
    for p in range(n_patients + 1, n_patients + 1 + max(2, n_patients // 4)):
        rel = f"valid/patient{p:05d}/study1/view1_frontal.jpg"
        valid.append([f"{prefix}/{rel}", "Female", "60", "Frontal", "AP", *_label_cells(rng, 14, False)])
        save_image(os.path.join(csv_dir if variant == "aimi" else root, rel), chest_image(*size, seed=p))
    _write_csv(os.path.join(csv_dir, "valid.csv"), CHEXPERT_HEADER, valid)
    return frontal


NIH_SUBSET_LIST = "train_official_subset.txt"  # the fixture's share of train_official.txt, for --train_list


def _official_patients(split: str, min_images: int) -> list[tuple[str, list[str]]]:
    """(patient, names) of the shipped data_splits/chestxray/{split}_official.txt, in list order, for patients with
    at least `min_images` images."""
    from data.chestxray_nih import OFFICIAL_SPLITS_DIR, read_name_list

    by_patient: dict[str, list[str]] = {}
    for name in read_name_list(os.path.join(OFFICIAL_SPLITS_DIR, f"{split}_official.txt")):
        by_patient.setdefault(name[:8], []).append(name)
    return [(p, names) for p, names in by_patient.items() if len(names) >= min_images]


def _findings_vector(findings: str) -> str:
    from data.chestxray_nih import FINDINGS

    present = set(findings.split("|"))
    return " ".join("1" if f in present else "0" for f in FINDINGS)


def make_nih(root: str, n_patients: int = 6, layout: str = "flat", data_entry: str = "v2020", size=(48, 48),
             seed: int = 0, list_format: str = "plain", odd_modes: bool = True, full_official: bool = False) -> int:
    """NIH tree at root (layout: flat | nested) with real file names from the reference's split lists.

    n_patients - 2 training patients of train_official.txt (2 or 3 images each), one patient of val_official.txt
    and one of test_official.txt (2 images each). The download's train_val_list.txt and test_list.txt list them,
    and train_official_subset.txt lists the training images (list_format 'labels': the reference's "name label x14"
    lines, consistent with Data_Entry's synthetic findings; 'plain': names only), for --train_list.
    full_official=True puts every image of train_official.txt (75,312) on disk as hard links to a few files, for
    runs on the default list. Returns the number of pre-training images.
    """
    rng = np.random.default_rng(seed)
    train_patients = _official_patients("train", 3)[: max(1, n_patients - 2)]
    train = [n for p, (_, names) in enumerate(train_patients, start=1) for n in names[: 2 if p % 2 else 3]]
    val = _official_patients("val", 2)[0][1][:2]
    test = _official_patients("test", 2)[0][1][:2]
    on_disk = train + val + test
    findings = {n: NIH_FINDINGS[(i + rng.integers(0, 2)) % len(NIH_FINDINGS)] for i, n in enumerate(on_disk)}

    def folder(i):
        return os.path.join(root, "images") if layout == "flat" else os.path.join(root, f"images_{1 + i % 3:03d}",
                                                                                  "images")

    for i, name in enumerate(on_disk):
        mode = "RGBA" if odd_modes and i == 0 else "LA" if odd_modes and i == 1 else "L"
        save_image(os.path.join(folder(i), name), chest_image(*size, seed=seed * 1000 + i), mode)
    if full_official:
        # ext4 allows 65,000 links per file: rotate among the fixture's own training images
        present = set(on_disk)
        sources = [os.path.join(folder(i), n) for i, n in enumerate(train)]
        official = _official_patients("train", 1)
        extra = [n for _, names in official for n in names if n not in present]
        for i, name in enumerate(extra):
            target = os.path.join(folder(i), name)
            os.makedirs(os.path.dirname(target), exist_ok=True)
            os.link(sources[i % len(sources)], target)
            findings[name] = NIH_FINDINGS[i % len(NIH_FINDINGS)]
        train = [n for _, names in official for n in names]
    header = NIH_HEADER + ("," if data_entry == "2017" else "")
    entry_name = "Data_Entry_2017_v2020.csv" if data_entry == "v2020" else "Data_Entry_2017.csv"
    with open(os.path.join(root, entry_name), "w", encoding="utf-8") as f:
        f.write(header + "\n")
        for k, (name, finding) in enumerate(findings.items()):
            row = [name, finding, str(k % 7), str(int(name[:8])), str(30 + k % 50), "M" if k % 2 else "F",
                   "PA" if k % 3 else "AP", "2500", "2048", "0.168", "0.168"]
            f.write(",".join(row) + ("," if data_entry == "2017" else "") + "\n")
    _write_lines(os.path.join(root, "train_val_list.txt"), sorted(train + val))
    _write_lines(os.path.join(root, "test_list.txt"), test)
    _write_lines(os.path.join(root, NIH_SUBSET_LIST),
                 [f"{n} {_findings_vector(findings[n])}" if list_format == "labels" else n for n in train])
    return len(train)


LABELLED_LISTS = {"train": "train_labelled.txt", "val": "val_labelled.txt", "test": "test_labelled.txt"}


def draw_findings(img: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """The image with the first three findings drawn in, each so it survives the reference's training transform
    (random crops down to 8% of the area, so up to 3.5x zoom, flips, small rotations) and a short fine-tuning learns
    it: 0 (Atelectasis) horizontal stripes, 1 (Cardiomegaly) vertical stripes, 2 (Effusion) a brighter image. The
    other findings draw nothing: they are random labels, at chance by design."""
    h, w = img.shape
    y, x = np.mgrid[0:h, 0:w].astype(np.float32)
    period = max(h, w) / 6
    img = img.astype(np.float32)
    if labels[0]:
        img = img + 60 * (np.sin(2 * np.pi * y / period) > 0)
    if labels[1]:
        img = img + 60 * (np.sin(2 * np.pi * x / period) > 0)
    if labels[2]:
        img = img + 60
    return img


def make_nih_labelled(root: str, patients=(8, 3, 3), images_per_patient: int = 2, size=(64, 64), seed: int = 0,
                      first_patient: int = 100000) -> dict[str, str]:
    """NIH-style labelled lists for fine-tuning: root/images/<8-digit patient>_<nnn>.png and root/<role>_labelled.txt
    ("name label x14"), with patients[0], [1], [2] patients in train, val and test (disjoint). Findings are drawn
    into the image as draw_findings says (the first three, so a short fine-tuning learns them, and a mistake that
    misaligns labels and images shows as chance AUROC on them). Labels are random (30% positive each); every split
    starts with an image of no finding and one of all findings, so each finding has both classes. Returns role -> list
    path."""
    rng = np.random.default_rng(seed)
    lists, patient = {}, first_patient
    for role, count in zip(("train", "val", "test"), patients):
        lines = []
        for _ in range(count):
            for i in range(images_per_patient):
                name = f"{patient:08d}_{i:03d}.png"
                n = len(lines)
                labels = np.ones(14, int) if n == 1 else np.zeros(14, int) if n == 0 else (rng.random(14) < 0.3)
                img = draw_findings(chest_image(*size, seed=int(rng.integers(1 << 30))), labels)
                save_image(os.path.join(root, "images", name), np.clip(img, 0, 255).astype(np.uint8))
                lines.append(name + " " + " ".join(str(int(v)) for v in labels))
            patient += 1
        lists[role] = os.path.join(root, LABELLED_LISTS[role])
        _write_lines(lists[role], lines)
    return lists


def _write_lines(path: str, lines: list[str]) -> None:
    with open(path, "w", encoding="utf-8") as f:
        f.write("".join(f"{line}\n" for line in lines))


def make_mimic(root: str, n_subjects: int = 5, resized: bool = False, gz: bool = True, size=(48, 40),
               seed: int = 0, version: str = "2.0.0") -> int:
    """MIMIC-CXR-JPG tree at root (version 2.1.0 adds IMAGE_FILENAMES, the labelled test set and wget's
    index.html files). Returns the number of train AP/PA images of labelled studies (the reference pool)."""
    rng = np.random.default_rng(seed)
    meta, split, labels, selected = [], [], [], 0
    views_cycle = ["PA", "LATERAL", "AP", "LL", "AP AXIAL", ""]
    for s in range(n_subjects):
        subject = str(10000000 + s * 1234567 % 9000000)
        split_name = "test" if s == n_subjects - 1 else "validate" if s == n_subjects - 2 else "train"
        for t in range(2):
            study = str(50000000 + s * 10 + t)
            labelled = not (s == 0 and t == 1)  # a study with images but no label row
            if labelled:
                labels.append([subject, study, *_label_cells(rng, 14)])
            for k in range(3):
                view = views_cycle[(s + t + k) % len(views_cycle)]
                dicom = "-".join(f"{rng.integers(0, 2**32):08x}" for _ in range(5))
                meta.append([dicom, subject, study, "CHEST (PA AND LAT)", view, str(size[0]), str(size[1]),
                             "21530412", "104512.25", "CHEST (PA AND LAT)", "postero-anterior", "Erect"])
                split.append([dicom, study, subject, split_name])
                selected += split_name == "train" and view in ("AP", "PA") and labelled
                folder = os.path.join(root, "files_resized_320" if resized else "files", f"p{subject[:2]}",
                                      f"p{subject}", f"s{study}")
                save_image(os.path.join(folder, f"{dicom}.jpg"), chest_image(*size, seed=len(meta),
                                                                             lateral=view in ("LATERAL", "LL")))
    ext = ".csv.gz" if gz else ".csv"
    if version == "2.1.0":
        folder = "files_resized_320" if resized else "files"
        with open(os.path.join(root, "IMAGE_FILENAMES"), "w", encoding="utf-8") as f:
            f.writelines(f"{folder}/p{m[1][:2]}/p{m[1]}/s{m[2]}/{m[0]}.jpg\n" for m in meta)
        _write_csv(os.path.join(root, "mimic-cxr-2.1.0-test-set-labeled.csv"), ["study_id", *MIMIC_LABELS],
                   [[m[2], *_label_cells(rng, 14, False)] for m, sp in zip(meta, split) if sp[3] == "test"])
        with open(os.path.join(root, "index.html"), "w", encoding="utf-8") as f:
            f.write("<html></html>\n")
    _write_csv(os.path.join(root, f"mimic-cxr-2.0.0-metadata{ext}"), MIMIC_META_HEADER, meta)
    _write_csv(os.path.join(root, f"mimic-cxr-2.0.0-split{ext}"), ["dicom_id", "study_id", "subject_id", "split"],
               split)
    _write_csv(os.path.join(root, f"mimic-cxr-2.0.0-chexpert{ext}"), ["subject_id", "study_id", *MIMIC_LABELS],
               labels)
    return selected


def _write_csv(path: str, header: list[str], rows: list[list[str]]) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(header)
    writer.writerows(rows)
    data = buf.getvalue().encode("utf-8")
    if path.endswith(".gz"):
        data = gzip.compress(data, mtime=0)
    with open(path, "wb") as f:
        f.write(data)


def make_reference_layout(data_path: str, scale: int = 1, size=(48, 48), seed: int = 0) -> dict[str, int]:
    """The three reference sources under data_path, as --data_path expects them."""
    return {
        "chexpert": make_chexpert(data_path, n_patients=6 * scale, size=size, seed=seed),
        "chestxray_nih": make_nih(os.path.join(data_path, "nih_chestxray"), n_patients=6 * scale, size=size, seed=seed),
        "mimic_cxr": make_mimic(os.path.join(data_path, "mimic_cxr"), n_subjects=5 * scale, size=size, seed=seed),
    }


PADCHEST_COLUMNS = ["", "ImageID", "ImageDir", "StudyDate_DICOM", "StudyID", "PatientID", "PatientBirth",
                    "PatientSex_DICOM", "ViewPosition_DICOM", "Projection", "MethodProjection", "Pediatric",
                    "Modality_DICOM", "Manufacturer_DICOM", "PhotometricInterpretation_DICOM",
                    "PixelRepresentation_DICOM", "PixelAspectRatio_DICOM", "SpatialResolution_DICOM",
                    "BitsStored_DICOM", "WindowCenter_DICOM", "WindowWidth_DICOM", "Rows_DICOM", "Columns_DICOM",
                    "XRayTubeCurrent_DICOM", "Exposure_DICOM", "ExposureInuAs_DICOM", "ExposureTime",
                    "RelativeXRayExposure_DICOM", "ReportID", "Report", "MethodLabel", "Labels", "Localizations",
                    "LabelsLocalizationsBySentence", "labelCUIS", "LocalizationsCUIS"]


def save_png16(path: str, pixels8: np.ndarray, full_range: bool) -> None:
    """A 16-bit PNG: 12-bit values (x16) or values spread over the full 16 bits (x257)."""
    os.makedirs(os.path.dirname(path), exist_ok=True)
    values = pixels8.astype(np.uint16) * (257 if full_range else 16)
    Image.fromarray(values).save(path)


def truncate_file(path: str, keep: float = 0.6) -> None:
    with open(path, "rb") as f:
        payload = f.read()
    with open(path, "wb") as f:
        f.write(payload[: int(len(payload) * keep)])


def make_padchest(root: str, n_images: int = 12, flat: bool = False, size=(48, 40), seed: int = 0,
                  truncated: bool = False) -> int:
    """PadChest folder at root; returns the count kept by the default Projection filter."""
    projections = ["PA", "L", "AP", "AP_horizontal", "COSTAL", "UNK"]
    labels = ["['normal']", "['COPD signs', ' pacemaker']", "", "[' exclude']"]
    rows, kept = [], 0
    for i in range(n_images):
        image_id = f"{111122223333 + i}_{i:02d}-234-567.png"
        image_dir = str(i % 3)
        projection, label = projections[i % len(projections)], labels[i % len(labels)]
        row = dict.fromkeys(PADCHEST_COLUMNS, "")
        row.update({"": str(i), "ImageID": image_id, "ImageDir": image_dir, "PatientID": f"pat{i // 2}",
                    "Projection": projection, "Labels": label, "BitsStored_DICOM": "12", "Pediatric": "No",
                    "PhotometricInterpretation_DICOM": "MONOCHROME2"})
        rows.append([row[c] for c in PADCHEST_COLUMNS])
        kept += projection in ("PA", "AP", "AP_horizontal") and "exclude" not in label
        path = os.path.join(root, image_id) if flat else os.path.join(root, image_dir, image_id)
        save_png16(path, chest_image(*size, seed=seed * 1000 + i, lateral=projection == "L"), full_range=i % 2 == 1)
        if truncated and i == 0:
            truncate_file(path)
    _write_csv(os.path.join(root, "PADCHEST_chest_x_ray_images_labels_160K_01.02.19.csv.gz"), PADCHEST_COLUMNS, rows)
    return kept


def write_dicom(path: str, pixels: np.ndarray, photometric: str = "MONOCHROME2", bits_stored: int = 12,
                window: tuple[float, float] | None = None, rescale: tuple[float, float] | None = None,
                file_meta: bool = True, pixel_data: bool = True, patient_id: str = "anon") -> None:
    """An uncompressed little-endian DICOM (no plugins needed to read it back)."""
    import pydicom
    from pydicom.dataset import FileDataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, SecondaryCaptureImageStorage, generate_uid

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = SecondaryCaptureImageStorage
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = FileDataset(path, {}, file_meta=meta, preamble=b"\0" * 128)
    ds.SOPClassUID, ds.SOPInstanceUID = meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID
    ds.Modality, ds.PatientID = "DX", patient_id
    ds.Rows, ds.Columns = pixels.shape
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, photometric
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, bits_stored, bits_stored - 1, 0
    if window:
        ds.WindowCenter, ds.WindowWidth = window
    if rescale:
        ds.RescaleSlope, ds.RescaleIntercept = rescale
    if pixel_data:
        ds.PixelData = pixels.astype(np.uint16).tobytes()
    os.makedirs(os.path.dirname(path), exist_ok=True)
    if file_meta:
        ds.save_as(path, enforce_file_format=True)
    else:
        # no preamble, no DICM magic, no file meta: the broken VinDr files (vindr-cxr issue #3)
        ds.file_meta = FileMetaDataset()
        pydicom.filewriter.write_dataset(pydicom.filebase.DicomFileLike(open(path, "wb")), ds)


def gradient(height: int, width: int, max_value: int) -> np.ndarray:
    """Dark left, bright right (display terms), for orientation tests."""
    return np.tile(np.linspace(0, max_value, width), (height, 1)).astype(np.uint16)


def make_vindr(root: str, n_train: int = 4, size=(40, 48)) -> int:
    """VinDr-CXR train/ and test/ with MONOCHROME2 12-bit windowed, MONOCHROME1, 14-bit and no-meta files."""
    variants = [
        {"bits_stored": 12, "window": (2048, 4096)},
        {"bits_stored": 12, "photometric": "MONOCHROME1"},
        {"bits_stored": 14},
        {"bits_stored": 12, "file_meta": False},
    ]
    for i in range(n_train):
        v = variants[i % len(variants)]
        pixels = gradient(*size, (1 << v["bits_stored"]) - 1)
        if v.get("photometric") == "MONOCHROME1":
            pixels = pixels.max() - pixels  # stored inverted: displays dark-left after inversion
        write_dicom(os.path.join(root, "train", f"{i:032x}.dicom"), pixels, **v)
    write_dicom(os.path.join(root, "test", f"{999:032x}.dicom"), gradient(*size, 4095))
    return n_train


COVIDX_SOURCES = {"normal": "rsna", "pneumonia": "rsna", "COVID-19": "ricord"}  # as COVIDx9A's test set


def make_covidx(root: str, train: int = 60, test: int = 24, images_per_patient: int = 2, size=(48, 48),
                distinct: int = 0, seed: int = 0, spaces: bool = False) -> dict[str, str]:
    """COVIDx in the COVID-Net layout: root/train_COVIDx9A.txt and test_COVIDx9A.txt ("patient_id filename label
    source" per line) with the images in root/train/ and root/test/. Classes cycle normal, pneumonia, COVID-19 (the
    labels COVIDx9A's files use), one class per patient, drawn so a classifier can learn them (draw_findings):
    pneumonia a brighter image, COVID-19 vertical stripes. `distinct` > 0 writes only that many image files per
    class and split and hard-links the rest to them, so the real line counts (30,130 and 400) cost little disk.
    `spaces` puts a space in some file names, as some COVIDx files have. Returns {'train': path, 'test': path}."""
    rng = np.random.default_rng(seed)
    h, w = size
    classes = ["normal", "pneumonia", "COVID-19"]
    files = {}
    for role, count in (("train", train), ("test", test)):
        folder = os.path.join(root, role)
        os.makedirs(folder, exist_ok=True)
        lines, made = [], {c: [] for c in classes}
        for k in range(count):
            patient = k // images_per_patient
            label = classes[patient % 3]
            name = f"{role}-{patient:06d}-{k % images_per_patient}{' copy' if spaces and k % 7 == 3 else ''}.png"
            path = os.path.join(folder, name)
            if distinct and len(made[label]) >= distinct:
                os.link(made[label][k % distinct], path)
            else:
                img = draw_findings(chest_image(h, w, seed=int(rng.integers(1 << 30))),
                                    [0, label == "COVID-19", label == "pneumonia"])
                save_image(path, np.clip(img, 0, 255).astype(np.uint8))
                made[label].append(path)
            lines.append(f"{role[:2]}{patient} {name} {label} {COVIDX_SOURCES[label]}")
        files[role] = os.path.join(root, f"{role}_COVIDx9A.txt")
        _write_lines(files[role], lines)
    return files


def make_csv_dataset(root: str, patients=(8, 3, 3), images_per_patient: int = 2, size=(32, 32), seed: int = 0,
                     first_patient: int = 0) -> dict[str, str]:
    """A user's own data for --dataset csv: root/images/ with PNG, 16-bit PNG and DICOM files (every third image of a
    patient in each of the other two formats), and root/{train,val,test}.csv with the columns path (relative to root),
    patient, two 0/1 findings (`opacity`: stripes drawn in, `device`: random) and one class per image
    (`view_class`: a, b or c, cycling by patient). Returns role -> CSV path."""
    rng = np.random.default_rng(seed)
    h, w = size
    os.makedirs(os.path.join(root, "images"), exist_ok=True)
    files, patient = {}, first_patient
    for role, count in zip(("train", "val", "test"), patients):
        rows = []
        for _ in range(count):
            for i in range(images_per_patient):
                opacity = int(len(rows) % 2 == 0) if len(rows) < 2 else int(rng.random() < 0.5)
                img = chest_image(h, w, seed=int(rng.integers(1 << 30))).astype(np.float32)
                if opacity:  # vertical stripes (draw_findings' second): they survive the 16-bit and DICOM windowing
                    img = draw_findings(img, [0, 1, 0])
                pixels = np.clip(img, 0, 255).astype(np.uint8)
                kind = ("png", "png16", "dcm")[(patient + i) % 3]
                name = f"p{patient:05d}_{i}.{'dcm' if kind == 'dcm' else 'png'}"
                path = os.path.join(root, "images", name)
                if kind == "png":
                    save_image(path, pixels)
                elif kind == "png16":
                    save_png16(path, pixels, full_range=True)
                else:
                    write_dicom(path, pixels.astype(np.uint16) * 16)
                rows.append([f"images/{name}", f"P{patient:05d}", str(opacity), str(int(rng.random() < 0.3)),
                             "abc"[patient % 3]])
            patient += 1
        files[role] = os.path.join(root, f"{role}.csv")
        _write_csv(files[role], ["path", "patient", "opacity", "device", "view_class"], rows)
    return files


def make_node21(root: str, images: int = 40, size=(64, 64), seed: int = 0, extension: bool = True,
                reference_lists: bool = False) -> str:
    """NODE21's processed layout: root/metadata.csv (img_name, x, y, width, height, label: a row per nodule box, one
    row with label 0 for an image without one) and root/images/<name>.mha, 16-bit MetaImages written with SimpleITK.
    Every other image holds a nodule (a bright disc at its box, drawn so a classifier can learn it) and every
    fourth of those two, so their rows merge. Names are n0000.mha (nodule) and c0001.mha (control), as the release
    names them; extension=False writes img_name without '.mha'. reference_lists also writes the reference's
    train_mae.txt (the first 80% of the images) and test_mae.txt (the rest), `fname label` lines. Returns the
    metadata path."""
    import SimpleITK as sitk

    rng = np.random.default_rng(seed)
    h, w = size
    y, x = np.mgrid[0:h, 0:w].astype(np.float32)
    os.makedirs(os.path.join(root, "images"), exist_ok=True)
    rows = []
    for k in range(images):
        nodules = 0 if k % 2 else (2 if k % 8 == 0 else 1)
        name = f"{'n' if nodules else 'c'}{k:04d}"
        img = chest_image(h, w, seed=int(rng.integers(1 << 30))).astype(np.float32) * 12  # 12-bit range
        for _ in range(nodules):
            cx, cy, r = rng.uniform(0.3, 0.7) * w, rng.uniform(0.3, 0.7) * h, max(3.0, 0.1 * w)
            img[(x - cx) ** 2 + (y - cy) ** 2 < r * r] += 1400
            rows.append([name + ".mha" if extension else name, str(int(cx - r)), str(int(cy - r)), str(int(2 * r)),
                         str(int(2 * r)), "1"])
        if not nodules:
            rows.append([name + ".mha" if extension else name, "0", "0", "0", "0", "0"])
        sitk.WriteImage(sitk.GetImageFromArray(np.clip(img, 0, 4095).astype(np.int16)),
                        os.path.join(root, "images", name + ".mha"))
    path = os.path.join(root, "metadata.csv")
    _write_csv(path, ["img_name", "x", "y", "width", "height", "label"], rows)
    if reference_lists:
        labels = {}
        for row in rows:
            labels[row[0]] = max(labels.get(row[0], 0), int(row[-1]))
        names = list(labels)
        cut = round(0.8 * len(names))
        _write_lines(os.path.join(root, "train_mae.txt"), [f"{n} {labels[n]}" for n in names[:cut]])
        _write_lines(os.path.join(root, "test_mae.txt"), [f"{n} {labels[n]}" for n in names[cut:]])
    return path


def make_lung_masks(root: str, images: int = 40, size=(64, 64), seed: int = 0, mask_suffix: str = "_mask") -> str:
    """A lung-mask release in the folder layout: root/images/cxr_0000.png and root/masks/cxr_0000<mask_suffix>.png
    (0/255), the lungs exactly as chest_image_and_lungs draws them (darker fields whose size and place vary by
    image). Returns root."""
    rng = np.random.default_rng(seed)
    for k in range(images):
        img, lungs = chest_image_and_lungs(*size, seed=int(rng.integers(1 << 30)))
        save_image(os.path.join(root, "images", f"cxr_{k:04d}.png"), img)
        save_image(os.path.join(root, "masks", f"cxr_{k:04d}{mask_suffix}.png"), lungs.astype(np.uint8) * 255)
    return root


def siim_image_id(k: int) -> str:
    """An ImageId shaped like SIIM-ACR's (a DICOM UID)."""
    return f"1.2.276.0.7230010.3.1.4.8323329.{1000 + k}.1517875167.{500000 + k}"


def pneumothorax(img: np.ndarray, lungs: np.ndarray, rng, sides: int) -> tuple[np.ndarray, list[np.ndarray]]:
    """Draw `sides` pneumothoraces: the outer third of a lung field made dark and smooth (air without lung markings),
    one region per side; (image, [region masks])."""
    h, w = lungs.shape
    x = np.mgrid[0:h, 0:w][1]
    regions = []
    for side in rng.permutation(2)[:sides]:
        field = lungs & ((x < w / 2) if side == 0 else (x >= w / 2))
        cols = np.flatnonzero(field.any(axis=0))
        if not len(cols):
            continue
        cut = cols[0] + len(cols) // 3 if side == 0 else cols[-1] - len(cols) // 3
        region = field & ((x < cut) if side == 0 else (x > cut))
        img = img.copy()
        img[region] = 12
        regions.append(region)
    return img, regions


def make_siim(root: str, images: int = 30, size=(64, 64), seed: int = 0, dicom: bool = True,
              images_per_patient: int = 2) -> str:
    """SIIM-ACR Pneumothorax's released layout: root/train-rle.csv ("ImageId, EncodedPixels", data/rle.py's
    convention: one row per region, " -1" for none) and the images as dicom-images-train/<study>/<series>/<ImageId>.dcm
    (12-bit, with a PatientID shared by images_per_patient images) or, dicom=False, as <ImageId>.png conversions
    without patient ids. Half the images hold a pneumothorax (pneumothorax(); a quarter of those on both sides, so
    two rows merge), the rest none. Returns the CSV's path."""
    from data.rle import encode

    rng = np.random.default_rng(seed)
    rows = []
    for k in range(images):
        image_id = siim_image_id(k)
        img, lungs = chest_image_and_lungs(*size, seed=int(rng.integers(1 << 30)))
        sides = 0 if k % 2 else (2 if k % 8 == 0 else 1)
        img, regions = pneumothorax(img, lungs, rng, sides)
        rows += [[image_id, " " + encode(region)] for region in regions] or [[image_id, " -1"]]
        if dicom:
            folder = os.path.join(root, "dicom-images-train", f"1.2.276.0.7230010.3.1.2.{k}",
                                  f"1.2.276.0.7230010.3.1.3.{k}")
            write_dicom(os.path.join(folder, image_id + ".dcm"), img.astype(np.uint16) * 16,
                        patient_id=f"patient{k // images_per_patient:04d}")
        else:
            save_image(os.path.join(root, "png", image_id + ".png"), img)
    path = os.path.join(root, "train-rle.csv")
    _write_csv(path, ["ImageId", " EncodedPixels"], rows)
    return path
