"""Synthetic inputs for the demo and tests: pyramidal JPEG-tiled TIFF slides, DICOM WSI, CT series as DICOM, MR
image folders with YOLO boxes and a CT-ICH-shaped slice tree.

Slides carry an identifying ImageDescription and CT headers carry patient name, ID and birth date, so that
privacy checks have something real to look for.
"""

from __future__ import annotations

import csv
import uuid
from dataclasses import dataclass
from pathlib import Path

import numpy as np

# Two clot classes that differ in a learnable way: red-cell-rich (CE) vs fibrin/platelet-rich (LAA) staining.
CLASS_COLOURS = {"CE": (196, 64, 92), "LAA": (150, 110, 190)}


@dataclass(frozen=True)
class SyntheticPatient:
    """Identity written into synthetic headers; tests assert none of it reaches any output."""

    name: str
    patient_id: str
    birth_date: str


def label_photo(text: str) -> np.ndarray:
    """A photo of a slide label bearing ``text`` (a scanner's label camera sees the patient's name)."""
    import cv2

    label = np.full((200, 400, 3), 235, np.uint8)
    cv2.putText(label, text, (10, 110), cv2.FONT_HERSHEY_SIMPLEX, 0.9, (20, 20, 20), 2)
    return label


def slide_array(size: int, label: str, rng: np.random.Generator) -> np.ndarray:
    """``uint8[size, size, 3]``: tissue-like blobs of the class's stain on a near-white background."""
    h = w = size
    img = np.clip(rng.normal(238, 4, (h, w, 3)), 0, 255).astype(np.uint8)
    yy, xx = np.mgrid[0:h, 0:w]
    tissue = np.zeros((h, w), bool)
    for _ in range(3):
        cy, cx = rng.uniform(0.25, 0.75, 2) * size
        ry, rx = rng.uniform(0.12, 0.25, 2) * size
        tissue |= ((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2 <= 1.0
    base = np.array(CLASS_COLOURS[label], np.float32)
    texture = rng.normal(0, 18, (h, w, 1)).astype(np.float32)
    stained = np.clip(base + texture, 0, 255).astype(np.uint8)
    img[tissue] = stained[tissue]
    return img


def write_pyramid_tiff(
    path: Path, level0: np.ndarray, mpp: float = 0.5, levels: int = 4, note: str = "", icc: bytes | None = None
) -> None:
    """A generic tiled TIFF pyramid (JPEG tiles, 256 px) that OpenSlide reads, with MPP in the resolution tags and
    ``icc`` as its embedded colour profile."""
    import tifffile

    with tifffile.TiffWriter(path) as tw:
        arr = level0
        for i in range(levels):
            res = 1e4 / (mpp * 2**i)  # pixels per centimetre
            tw.write(
                arr,
                tile=(256, 256),
                compression="jpeg",
                photometric="rgb",
                subfiletype=1 if i else 0,
                resolution=(res, res),
                resolutionunit="CENTIMETER",
                description=note if i == 0 and note else None,
                iccprofile=icc,
                metadata=None,
            )
            arr = arr[::2, ::2]
            if min(arr.shape[:2]) < 256:
                break


def swapped_profile() -> bytes:
    """An ICC profile of RGB (pydicom's test ``crayons.icc``, which is near sRGB) with the tags of its red and green
    primaries exchanged: converted to sRGB, device red is shown green (``--color-profile apply``'s tests)."""
    import struct

    from pydicom.data import get_testdata_file

    icc = bytearray(Path(get_testdata_file("crayons.icc")).read_bytes())
    (count,) = struct.unpack(">I", icc[128:132])
    tags = {bytes(icc[132 + 12 * i : 136 + 12 * i]): 132 + 12 * i for i in range(count)}
    r, g = tags[b"rXYZ"], tags[b"gXYZ"]
    icc[r + 4 : r + 12], icc[g + 4 : g + 12] = icc[g + 4 : g + 12], icc[r + 4 : r + 12]  # their offsets and sizes
    return bytes(icc)


def make_slides(root: Path, n: int = 4, size: int = 2048, seed: int = 0, first: int = 0) -> tuple[list[Path], Path]:
    """``n`` slides (alternating CE/LAA, one patient each) and a STRIP AI label CSV; returns (paths, csv).
    ``first``: the number of the first slide, for slides named apart from another set's."""
    rng = np.random.default_rng(seed)
    root.mkdir(parents=True, exist_ok=True)
    paths, rows = [], []
    for i in range(first, first + n):
        label = "CE" if i % 2 == 0 else "LAA"
        image_id = f"{1000 + i:06d}_0"
        path = root / f"{image_id}.tif"
        note = f"Patient: SLIDEPATIENT^{i} MRN{90000 + i}"
        write_pyramid_tiff(path, slide_array(size, label, rng), note=note)
        paths.append(path)
        rows.append({"image_id": image_id, "center_id": 11, "patient_id": f"p{i:04d}", "image_num": 0, "label": label})
    csv_path = root.parent / f"{root.name}_labels.csv"  # beside the slides: only slides live in the folder
    with open(csv_path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=["image_id", "center_id", "patient_id", "image_num", "label"])
        writer.writeheader()
        writer.writerows(rows)
    return paths, csv_path


def _wsi_instance(image: np.ndarray, image_type: list[str], mpp: float, uids: tuple[str, str, str], patient):
    """One DICOM WSI instance: ``image`` in TILED_FULL 256 px JPEG frames (white beyond the image's edge)."""
    import imagecodecs
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.encaps import encapsulate
    from pydicom.uid import JPEGBaseline8Bit, generate_uid

    from ingest.dicom_wsi import WSI_SOP_CLASS

    tile, (h, w) = 256, image.shape[:2]
    frames = []
    for ty in range(0, h, tile):
        for tx in range(0, w, tile):
            frame = np.full((tile, tile, 3), 255, np.uint8)
            part = image[ty : ty + tile, tx : tx + tile]
            frame[: part.shape[0], : part.shape[1]] = part
            frames.append(imagecodecs.jpeg8_encode(frame, level=95, outcolorspace="YCBCR", subsampling="422"))
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID, ds.file_meta.TransferSyntaxUID = WSI_SOP_CLASS, JPEGBaseline8Bit
    ds.SOPClassUID, ds.SOPInstanceUID = WSI_SOP_CLASS, generate_uid()
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.FrameOfReferenceUID = uids
    ds.Modality, ds.ImageType, ds.DimensionOrganizationType = "SM", image_type, "TILED_FULL"
    ds.PatientName, ds.PatientID, ds.PatientBirthDate = patient.name, patient.patient_id, patient.birth_date
    ds.ContainerIdentifier = f"SLIDE-{patient.patient_id}"
    ds.TotalPixelMatrixColumns, ds.TotalPixelMatrixRows, ds.TotalPixelMatrixFocalPlanes = w, h, 1
    ds.Rows = ds.Columns = tile
    ds.NumberOfFrames = len(frames)
    ds.SamplesPerPixel, ds.PhotometricInterpretation, ds.PlanarConfiguration = 3, "YBR_FULL_422", 0
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 8, 8, 7, 0
    measures, shared, path = Dataset(), Dataset(), Dataset()
    measures.PixelSpacing, measures.SliceThickness = [mpp / 1000, mpp / 1000], 0.001  # millimetres
    shared.PixelMeasuresSequence = [measures]
    ds.SharedFunctionalGroupsSequence = [shared]
    path.OpticalPathIdentifier = "1"
    ds.OpticalPathSequence, ds.NumberOfOpticalPaths = [path], 1
    ds.PixelData = encapsulate(frames)
    ds["PixelData"].VR = "OB"
    return ds


def write_dicom_wsi(folder: Path, level0: np.ndarray, patient: SyntheticPatient, mpp: float = 0.5, levels: int = 3):
    """A DICOM WSI as scanners export it: one file per pyramid level plus a label image (which carries the
    patient's name in its header, as real ones do on the glass), UID file names, all in ``folder``."""
    from pydicom.uid import generate_uid

    folder.mkdir(parents=True, exist_ok=True)
    uids = (generate_uid(), generate_uid(), generate_uid())
    image = level0
    for i in range(levels):
        kind = ["ORIGINAL", "PRIMARY", "VOLUME", "NONE"] if i == 0 else ["DERIVED", "PRIMARY", "VOLUME", "RESAMPLED"]
        ds = _wsi_instance(image, kind, mpp * 2**i, uids, patient)
        ds.save_as(folder / f"{ds.SOPInstanceUID}.dcm", enforce_file_format=True)
        image = np.ascontiguousarray(image[::2, ::2])
    label = np.full((200, 400, 3), 250, np.uint8)
    ds = _wsi_instance(label, ["ORIGINAL", "PRIMARY", "LABEL", "NONE"], 10.0, uids, patient)
    ds.save_as(folder / f"{ds.SOPInstanceUID}.dcm", enforce_file_format=True)


def ct_volume(slices: int, size: int, bleed: bool, rng: np.random.Generator) -> np.ndarray:
    """Stored values ``int16[slices, size, size]`` (HU + 1024): skull ring, brain, optional hyperdense bleed."""
    yy, xx = np.mgrid[0:size, 0:size] - size / 2
    r = np.hypot(yy, xx) / (size / 2)
    hu = np.full((slices, size, size), -1000.0)
    hu[:, r < 0.85] = 1000.0
    hu[:, r < 0.75] = 32.0
    if bleed:
        by, bx = rng.uniform(-0.3, 0.3, 2) * size
        blob = np.hypot(yy - by, xx - bx) < size * 0.12
        hu[slices // 4 : 3 * slices // 4, blob] = 70.0
    hu += rng.normal(0, 3, hu.shape)
    return np.rint(hu + 1024).astype(np.int16)


def ct_slice_dataset(
    pixels: np.ndarray, patient: SyntheticPatient, study: str, series: str, k: int, thickness=5.0, wrapped=False
):
    """One CT slice (stored values ``int16[H, W]``, HU = stored - 1024) with identifying headers, as a user has.
    ``wrapped``: its HU as RSNA's faulty slices hold them, 12-bit two's complement under an unsigned header with
    intercept 0 (:func:`ingest.windowing.wrapped_12bit`)."""
    import pydicom
    from pydicom.dataset import FileMetaDataset
    from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = CTImageStorage
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = pydicom.Dataset()
    ds.file_meta = meta
    ds.SOPClassUID, ds.SOPInstanceUID = CTImageStorage, meta.MediaStorageSOPInstanceUID
    ds.PatientName, ds.PatientID, ds.PatientBirthDate = patient.name, patient.patient_id, patient.birth_date
    ds.InstitutionName, ds.ReferringPhysicianName, ds.AccessionNumber = "General Hospital", "HOUSE^G", "ACC7788"
    ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.Modality = study, series, "CT"
    ds.StudyDate, ds.InstanceNumber = "20240131", int(k) + 1
    ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
    ds.ImagePositionPatient = [0.0, 0.0, float(k) * thickness]
    ds.PixelSpacing, ds.SliceThickness = [0.5, 0.5], thickness
    ds.Rows, ds.Columns = pixels.shape
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 1
    ds.RescaleIntercept, ds.RescaleSlope = -1024, 1
    ds.PixelData = pixels.astype(np.int16).tobytes()
    if wrapped:
        ds.BitsStored, ds.HighBit, ds.PixelRepresentation, ds.RescaleIntercept = 12, 11, 0, 0
        ds.PixelData = ((pixels.astype(np.int32) - 1024) & 0xFFF).astype(np.uint16).tobytes()
    return ds


def enhanced_ct_dataset(volume: np.ndarray, patient: SyntheticPatient, study: str, series: str, thickness=5.0):
    """A CT series in one Enhanced CT file (stored values ``int16[F, H, W]``, HU = stored - 1024), as modern
    scanners export: rescale, orientation and positions in its functional groups, none at the top level."""
    import pydicom
    from pydicom.uid import EnhancedCTImageStorage

    ds = ct_slice_dataset(volume[0], patient, study, series, 0, thickness)
    ds.SOPClassUID = ds.file_meta.MediaStorageSOPClassUID = EnhancedCTImageStorage
    for name in ("RescaleIntercept", "RescaleSlope", "ImageOrientationPatient", "ImagePositionPatient"):
        delattr(ds, name)
    ds.NumberOfFrames = len(volume)
    transform = pydicom.Dataset()
    transform.RescaleIntercept, transform.RescaleSlope, transform.RescaleType = -1024, 1, "HU"
    orientation = pydicom.Dataset()
    orientation.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
    shared = pydicom.Dataset()
    shared.PixelValueTransformationSequence, shared.PlaneOrientationSequence = [transform], [orientation]
    ds.SharedFunctionalGroupsSequence = [shared]
    frames = []
    for k in range(len(volume)):
        position, item = pydicom.Dataset(), pydicom.Dataset()
        position.ImagePositionPatient = [0.0, 0.0, float(k) * thickness]
        item.PlanePositionSequence = [position]
        frames.append(item)
    ds.PerFrameFunctionalGroupsSequence = frames
    ds.PixelData = volume.astype(np.int16).tobytes()
    return ds


def write_ct_series(
    root: Path, patient: SyntheticPatient, slices: int, size: int, bleed: bool, seed: int, wrapped: bool = False
) -> None:
    """A CT series as single-frame DICOM files with random names, shuffled, in a nested folder (``wrapped``: as
    RSNA's faulty slices, :func:`ct_slice_dataset`)."""
    from pydicom.uid import generate_uid

    rng = np.random.default_rng(seed)
    vol = ct_volume(slices, size, bleed, rng)
    study, series = generate_uid(), generate_uid()
    folder = root / uuid.UUID(int=int(rng.integers(1 << 62))).hex[:8] / "series"
    folder.mkdir(parents=True, exist_ok=True)
    for k in rng.permutation(slices):
        ds = ct_slice_dataset(vol[k], patient, study, series, int(k), wrapped=wrapped)
        ds.save_as(folder / f"{uuid.UUID(int=int(rng.integers(1 << 62))).hex}.dcm", enforce_file_format=True)


def make_ct_series(root: Path, n: int = 2, slices: int = 12, size: int = 64, seed: int = 0, wrapped: bool = False):
    """``n`` CT series (alternating bleed / no bleed), a ``patient,label`` CSV; returns (patients, csv).
    ``wrapped``: stored as RSNA's faulty slices (:func:`ct_slice_dataset`), the same HU."""
    root.mkdir(parents=True, exist_ok=True)
    patients = [SyntheticPatient(f"DOE^JANE{i}", f"MRN{12345 + i}", f"19{60 + i}0101") for i in range(n)]
    for i, p in enumerate(patients):
        write_ct_series(root, p, slices, size, bleed=i % 2 == 0, seed=seed + i, wrapped=wrapped)
    csv_path = root.parent / f"{root.name}_labels.csv"
    with open(csv_path, "w", newline="") as f:
        f.write("patient,label\n")
        for i, p in enumerate(patients):
            f.write(f"{p.patient_id},{'bleed' if i % 2 == 0 else 'normal'}\n")
    return patients, csv_path


MRI_CLASSES = ("glioma", "meningioma", "notumor", "pituitary")


def mri_image(size: int, label: str, rng: np.random.Generator) -> tuple[np.ndarray, list[float] | None]:
    """``uint8[size, size]`` grey MR-like slice; tumour classes carry a bright blob whose size/place depends on
    the class. Returns the image and its YOLO box ``[cx, cy, w, h]`` (None without a tumour)."""
    yy, xx = np.mgrid[0:size, 0:size] / size
    img = np.where(np.hypot(yy - 0.5, xx - 0.5) < 0.42, 90.0, 10.0) + rng.normal(0, 8, (size, size))
    box = None
    if label != "notumor":
        radius = {"glioma": 0.12, "meningioma": 0.08, "pituitary": 0.05}.get(label, 0.1)
        cy = 0.7 if label == "pituitary" else rng.uniform(0.3, 0.6)
        cx = rng.uniform(0.35, 0.65)
        img[np.hypot(yy - cy, xx - cx) < radius] = 220.0
        box = [cx, cy, 2 * radius, 2 * radius]
    return np.clip(img, 0, 255).astype(np.uint8), box


def make_mri_folders(root: Path, per_class: int = 3, size: int = 64, seed: int = 0) -> Path:
    """Class-per-folder JPEGs (``root/images/<class>/<n>.jpg``, the layout of paper 004's Kaggle set) and YOLO
    boxes (``root/labels/<n>.txt``) for the tumour images; returns the labels folder."""
    import cv2

    rng = np.random.default_rng(seed)
    labels = root / "labels"
    labels.mkdir(parents=True, exist_ok=True)
    for c, name in enumerate(MRI_CLASSES):
        folder = root / "images" / name
        folder.mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            img, box = mri_image(size, name, rng)
            stem = f"{name[:2]}_{i:04d}"
            cv2.imwrite(str(folder / f"{stem}.jpg"), img)
            if box:
                (labels / f"{stem}.txt").write_text(f"{c} {' '.join(f'{v:.6f}' for v in box)}\n")
    return labels


CT_ICH_HEADER = (
    "PatientNumber,SliceNumber,Intraventricular,Intraparenchymal,Subarachnoid,Epidural,Subdural,"
    "No_Hemorrhage,Fracture_Yes_No"
)


def make_ct_ich(root: Path, patients: int = 4, slices: int = 8, size: int = 64, seed: int = 0) -> Path:
    """A CT-ICH-shaped tree (paper 002's dataset): ``Patients_CT/<049>/{brain,bone}/<k>.jpg``, hemorrhage masks
    ``<k>_HGE_Seg.jpg`` beside bleeding slices, and ``hemorrhage_diagnosis.csv``; even patients bleed in their
    middle slices. Returns the CSV."""
    import cv2

    rng = np.random.default_rng(seed)
    rows = [CT_ICH_HEADER]
    for p in range(patients):
        number = 49 + p
        vol = ct_volume(slices, size, bleed=p % 2 == 0, rng=rng).astype(np.float32) - 1024
        for k in range(slices):
            bleeding = p % 2 == 0 and slices // 4 <= k < 3 * slices // 4
            for window, (lo, hi) in (("brain", (0, 80)), ("bone", (-700, 2100))):
                folder = root / "Patients_CT" / f"{number:03d}" / window
                folder.mkdir(parents=True, exist_ok=True)
                img = np.clip((vol[k] - lo) * 255 / (hi - lo), 0, 255).astype(np.uint8)
                cv2.imwrite(str(folder / f"{k + 1}.jpg"), img)
                if bleeding and window == "brain":
                    cv2.imwrite(str(folder / f"{k + 1}_HGE_Seg.jpg"), (img > 200).astype(np.uint8) * 255)
            subtype = int(bleeding)
            rows.append(f"{number},{k + 1},0,{subtype},0,0,0,{1 - subtype},0")
    csv_path = root / "hemorrhage_diagnosis.csv"
    csv_path.write_text("\n".join(rows) + "\n")
    return csv_path
