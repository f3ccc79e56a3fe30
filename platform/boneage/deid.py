"""De-identification by allow-list: the one place the platform parses a DICOM header.

The platform writes no DICOM header value but PatientSex (the ``sex`` of predictions and API answers: bone-age
norms differ by sex), which DICOM PS3.15's Basic Application Level Confidentiality Profile keeps under its Retain
Patient Characteristics Option. Rather than strip identifiers after reading them, it never reads them:
:func:`read_dicom` keeps the elements of :data:`READ_TAGS` (the image pixel module, the modality and VOI LUTs,
PatientSex) and pydicom skips every other element without reading its value. Names, IDs, dates, UIDs,
institutions, free text and private tags so never become Python values, and no log line, warning (pydicom's
validation warnings quote the values they check), exception message, dataset repr, reject reason or output can
carry them. The file meta group, which pydicom always reads, is cut to the transfer syntax that decoding needs.

:data:`IDENTIFYING_KEYWORDS` is the Basic Profile in short: attributes that identify a patient or lead to one.
The tests write a DICOM file carrying every one of them through every path that reads DICOM and find none of
their values in anything written or logged; :data:`READ_TAGS` must never name one.
"""

from __future__ import annotations

import io

import pydicom
from pydicom.dataset import Dataset, FileMetaDataset

# What decoding reads (pydicom.pixels: the image pixel module; apply_modality_lut, apply_voi_lut) and PatientSex.
PIXEL_KEYWORDS = ("SamplesPerPixel", "PhotometricInterpretation", "PlanarConfiguration", "NumberOfFrames", "Rows",
                  "Columns", "BitsAllocated", "BitsStored", "HighBit", "PixelRepresentation", "PixelData",
                  "FloatPixelData", "DoubleFloatPixelData", "ExtendedOffsetTable", "ExtendedOffsetTableLengths")
LUT_KEYWORDS = ("ModalityLUTSequence", "RescaleSlope", "RescaleIntercept", "RescaleType", "VOILUTSequence",
                "WindowCenter", "WindowWidth", "VOILUTFunction")
SEX_KEYWORD = "PatientSex"
READ_TAGS = (*PIXEL_KEYWORDS, *LUT_KEYWORDS, SEX_KEYWORD)

IDENTIFYING_KEYWORDS = (
    # the patient
    "PatientName", "PatientID", "IssuerOfPatientID", "OtherPatientIDs", "OtherPatientNames", "PatientBirthName",
    "PatientMotherBirthName", "PatientBirthDate", "PatientBirthTime", "PatientAddress", "PatientTelephoneNumbers",
    "MedicalRecordLocator", "PatientComments", "AdditionalPatientHistory", "Occupation", "MilitaryRank",
    # the visit, the study and the instances (UIDs link a file to the hospital's records)
    "AccessionNumber", "AdmissionID", "StudyID", "StudyDate", "StudyTime", "SeriesDate", "AcquisitionDateTime",
    "ContentDate", "StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID", "FrameOfReferenceUID",
    "StudyDescription", "ImageComments",
    # the people and places
    "InstitutionName", "InstitutionAddress", "InstitutionalDepartmentName", "ReferringPhysicianName",
    "PerformingPhysicianName", "NameOfPhysiciansReadingStudy", "OperatorsName", "RequestingPhysician",
    "StationName", "DeviceSerialNumber",
)


def read_dicom(data: bytes, pixels: bool = True) -> Dataset:
    """A DICOM Part 10 file's :data:`READ_TAGS` elements (without the pixel data unless ``pixels``), and a file
    meta holding only its transfer syntax. Raises what pydicom raises for a file it cannot parse."""
    ds = pydicom.dcmread(io.BytesIO(data), specific_tags=list(READ_TAGS), stop_before_pixels=not pixels)
    meta = FileMetaDataset()
    if "TransferSyntaxUID" in ds.file_meta:
        meta.TransferSyntaxUID = ds.file_meta.TransferSyntaxUID
    ds.file_meta = meta
    return ds


def patient_sex(data: bytes) -> str | None:
    """PatientSex (0010,0040) of a DICOM file as ``M``/``F``; None when absent, anything else (e.g. ``O``) or
    unreadable (decoding the pixels then reports the problem)."""
    try:
        header = read_dicom(data, pixels=False)
    except Exception:  # pydicom raises many types for corrupt files
        return None
    value = str(header.get(SEX_KEYWORD, "")).strip().upper()
    return value if value in ("M", "F") else None
