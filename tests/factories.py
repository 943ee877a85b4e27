"""Small DICOM instances made on the fly, with the identifiers a test needs."""

from __future__ import annotations

import io
from typing import Any

import numpy as np
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid


def make_dataset(*, study: str | None = None, series: str | None = None,
                 sop: str | None = None, patient_id: str = "PAT-1",
                 patient_name: str = "Doe^Jane", rows: int = 16, columns: int = 16,
                 modality: str = "CT", value: int = 0, **extra: Any) -> Dataset:
    """A valid CT image data set with File Meta."""
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta.MediaStorageSOPClassUID = CTImageStorage
    ds.SOPClassUID = CTImageStorage
    ds.SOPInstanceUID = sop or generate_uid()
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.StudyInstanceUID = study or generate_uid()
    ds.SeriesInstanceUID = series or generate_uid()
    ds.PatientID = patient_id
    ds.PatientName = patient_name
    ds.PatientBirthDate = "19700101"
    ds.PatientSex = "F"
    ds.StudyDate = "20260102"
    ds.StudyTime = "101500"
    ds.AccessionNumber = "ACC1"
    ds.StudyID = "1"
    ds.StudyDescription = "CT chest"
    ds.ReferringPhysicianName = "House^Gregory"
    ds.Modality = modality
    ds.SeriesNumber = 1
    ds.InstanceNumber = 1
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.Rows = rows
    ds.Columns = columns
    ds.BitsAllocated = 16
    ds.BitsStored = 12
    ds.HighBit = 11
    ds.PixelRepresentation = 0
    ds.RescaleIntercept = -1024
    ds.RescaleSlope = 1
    pixels = (np.arange(rows * columns, dtype=np.uint16) + value) % 4096
    ds.PixelData = pixels.reshape(rows, columns).tobytes()
    for key, item in extra.items():
        setattr(ds, key, item)
    return ds


def to_bytes(ds: Dataset) -> bytes:
    """Encode as a Part 10 file."""
    buffer = io.BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    return buffer.getvalue()


def make_instance(**kwargs: Any) -> bytes:
    """A valid Part 10 CT instance as bytes."""
    return to_bytes(make_dataset(**kwargs))
