"""Phantoms as DICOM files, the way a radiography system exports them: what a hospital would send the service."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import DigitalXRayImageStorageForPresentation, ExplicitVRLittleEndian, generate_uid

BITS_STORED = 12


def new_dicom(sop_class_uid: str) -> Dataset:
    """An empty DICOM Part 10 dataset of the given SOP class (explicit VR little endian), with fresh UIDs."""
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = sop_class_uid
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID, ds.SOPInstanceUID = meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID
    return ds


def write_phantom_dicom(path: Path, image: np.ndarray, male: bool, age_months: int) -> Path:
    """``image`` (H, W) uint8 as a 12-bit MONOCHROME1 DX image (bone dark in the stored values, as many systems
    write it) with PatientSex and PatientAge; readers invert MONOCHROME1 back to bone-bright."""
    ds = new_dicom(DigitalXRayImageStorageForPresentation)
    ds.Modality, ds.BodyPartExamined, ds.ViewPosition, ds.Laterality = "DX", "HAND", "PA", "L"
    # Identifiers as an export carries them (synthetic here), which boneage.deid's reader never parses
    ds.PatientID, ds.PatientName = path.stem, "Phantom^Synthetic"
    ds.PatientSex = "M" if male else "F"
    ds.PatientAge = f"{min(age_months // 12, 999):03d}Y"
    stored = (4095 - image.astype(np.uint16) * 16).astype(np.uint16)  # (H, W) 12-bit, inverted
    ds.set_pixel_data(stored, photometric_interpretation="MONOCHROME1", bits_stored=BITS_STORED)
    path.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(path, enforce_file_format=True)
    return path
