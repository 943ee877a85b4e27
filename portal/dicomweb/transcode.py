"""Stored instances and frames re-encoded for WADO-RS; run in the isolated render processes.

PS3.18 8.7.3.4: the default transfer syntax on the web is Explicit VR Little Endian, and every
origin server must be able to convert what it holds into it; Implicit VR Little Endian and
Explicit VR Big Endian are not used on the web at all (8.7.3). Here an instance stored in
another syntax is rewritten: compressed or big endian pixel data decoded frame by frame
(pydicom's decoders, the preferred plugin first, DCMTK as the last resort, as for rendering),
an implicit VR or deflated data set re-encoded. Nothing here imports Flask: the functions run
through ``RenderPool.run`` (a hostile stream meets the decoders under a memory cap and a time
bound) and take a stored file, not its bytes, so the bytes need not cross the pipe. A large
answer comes back as a file in the store's temp folder, which the web worker streams and
deletes (the start-up reaper removes any that a crash leaves).
"""

from __future__ import annotations

import io
import itertools
import os
import struct
import tempfile
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from typing import IO, Any

import numpy as np
import pydicom
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.filebase import DicomFileLike
from pydicom.filewriter import write_dataset
from pydicom.pixels.decoders.base import get_decoder
from pydicom.pixels.utils import pack_bits
from pydicom.uid import (
    UID,
    DeflatedExplicitVRLittleEndian,
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
)

from portal.archive.store import StoredFile
from portal.imaging.render import PREFERRED_DECODERS, RenderRefused, dcmtk_decompressed

EXPLICIT_LE, IMPLICIT_LE = ExplicitVRLittleEndian, ImplicitVRLittleEndian
EXPLICIT_BE, DEFLATED = ExplicitVRBigEndian, DeflatedExplicitVRLittleEndian
MAX_VALUE_LENGTH = 0xFFFFFFFE  # PS3.5 7.1.1: the largest even 32-bit value length
PIXEL_DATA = 0x7FE00010
_PIXEL_TAG = struct.pack("<HH", 0x7FE0, 0x0010)


@dataclass(frozen=True)
class Transcoded:
    """An instance in Explicit VR Little Endian: ``data``, or when large the file ``path``
    (a ``.part`` file the receiver streams and then deletes)."""

    size: int
    data: bytes = b""
    path: str = ""


def native_length(ds: Dataset) -> int:
    """Bytes of the data set's pixel data once uncompressed (PS3.5 8.1.1; 0 without any)."""
    if "PixelData" not in ds:
        return 0
    bits = (int(ds.get("Rows") or 0) * int(ds.get("Columns") or 0)
            * int(ds.get("SamplesPerPixel") or 1) * int(ds.get("NumberOfFrames") or 1)
            * int(ds.get("BitsAllocated") or 8))
    return (bits + 7) // 8


def explicit_little_endian(source: StoredFile | bytes, spill_folder: str,
                           spill_over: int) -> Transcoded:
    """A stored instance re-encoded as Explicit VR Little Endian (PS3.18 8.7.3.4).

    Parameters
    ----------
    source : StoredFile or bytes
        The instance (a stored file is read and hash-checked here).
    spill_folder : str
        Where an answer larger than ``spill_over`` bytes (estimated before writing) is kept.
    spill_over : int
        The largest answer returned in memory.

    Raises
    ------
    RenderRefused
        When the pixel data cannot be decoded, or its decoded length would not fit the
        32-bit value length of Explicit VR Little Endian.
    """
    data = source if isinstance(source, bytes) else source.read()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ds = pydicom.dcmread(io.BytesIO(data))
    if native_length(ds) > MAX_VALUE_LENGTH:
        raise RenderRefused("the decoded pixel data would be too long for Explicit VR "
                            "Little Endian")
    path, memory = "", None
    if len(data) + native_length(ds) > spill_over:
        os.makedirs(spill_folder, mode=0o700, exist_ok=True)
        fd, path = tempfile.mkstemp(suffix=".part", dir=spill_folder)  # mode 0600
        sink: IO[bytes] = os.fdopen(fd, "w+b")
    else:
        sink = memory = io.BytesIO()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            try:
                _write(ds, data, sink)
            except (RenderRefused, MemoryError):
                raise
            except Exception as exc:  # pydicom cannot write the data set back (malformed)
                raise RenderRefused(f"the data set cannot be re-encoded: "
                                    f"{exc.__class__.__name__}") from exc
        size = sink.tell()
        if memory is not None:
            return Transcoded(size, data=memory.getvalue())
        sink.close()
        return Transcoded(size, path=path)
    except BaseException:
        sink.close()
        if path:
            os.unlink(path)
        raise


def _write(ds: Dataset, data: bytes, sink: IO[bytes]) -> None:
    syntax = str(ds.file_meta.get("TransferSyntaxUID", ""))
    for tag in [element.tag for element in ds if element.tag.element == 0]:
        del ds[tag]  # retired group lengths (PS3.5 7.2) would be wrong after re-encoding
    if "PixelData" not in ds or syntax in (IMPLICIT_LE, EXPLICIT_LE, DEFLATED):
        ds.file_meta.TransferSyntaxUID = UID(EXPLICIT_LE)
        ds.preamble = None  # zeros: a TIFF preamble's offsets would point into nothing now
        pydicom.dcmwrite(sink, ds, implicit_vr=False, little_endian=True,
                         enforce_file_format=True)
        return
    failure: Exception | None = None
    for plugin in dict.fromkeys((PREFERRED_DECODERS.get(syntax, ""), "")):
        sink.seek(0)
        sink.truncate()
        try:
            _decompressed(ds, syntax, plugin, sink)
            return
        except MemoryError:
            raise  # the render process's memory cap: reported as such by the pool
        except Exception as exc:  # every decoder has its own errors: all mean "cannot decode"
            failure = exc
    plain = dcmtk_decompressed(data, syntax)  # DCMTK reads some streams no Python decoder does
    if plain is not None:
        sink.seek(0)
        sink.truncate()
        sink.write(plain)
        return
    name = pydicom.uid.UID(syntax).name if syntax else "unknown transfer syntax"
    raise RenderRefused(f"the pixel data ({name}) cannot be decoded: "
                        f"{failure.__class__.__name__}") from failure


def _decompressed(ds: Dataset, syntax: str, plugin: str, sink: IO[bytes]) -> None:
    """Write the data set with its pixel data decoded, one frame in memory at a time.

    As pydicom's ``Dataset.decompress`` (YBR colour converted to RGB, planar configuration 0,
    Photometric Interpretation updated), but streamed, and keeping the SOP Instance UID: a
    lossless change of transfer syntax is the same instance (PS3.5 10).
    """
    frames = get_decoder(syntax).iter_array(ds, as_rgb=True, decoding_plugin=plugin)
    first, pixel_module = next(frames)
    head = Dataset({element.tag: element for element in ds if element.tag < PIXEL_DATA})
    tail = Dataset({element.tag: element for element in ds if element.tag > PIXEL_DATA})
    head.file_meta = FileMetaDataset(ds.file_meta)
    head.file_meta.TransferSyntaxUID = UID(EXPLICIT_LE)
    head.PhotometricInterpretation = pixel_module["photometric_interpretation"]
    if int(pixel_module["samples_per_pixel"]) > 1:
        head.PlanarConfiguration = int(pixel_module["planar_configuration"])
    pydicom.dcmwrite(sink, head, implicit_vr=False, little_endian=True,
                     enforce_file_format=True)
    vr = b"OB" if int(ds.BitsAllocated) <= 8 else b"OW"
    sink.write(_PIXEL_TAG + vr + bytes(6))
    length_at, length = sink.tell() - 4, 0
    arrays: Iterator[np.ndarray[Any, Any]] = itertools.chain(
        [first], (array for array, _ in frames))
    if int(ds.BitsAllocated) == 1:
        # Single-bit frames come back one pixel per byte and are packed across frame
        # boundaries (PS3.5 8.1.1), so all of them at once: an eighth of the pixel count.
        arrays = iter([np.frombuffer(pack_bits(np.concatenate(
            [array.ravel() for array in arrays]), pad=False), np.uint8)])
    for array in arrays:
        chunk = _little_endian_bytes(array)
        length += len(chunk)
        if length > MAX_VALUE_LENGTH:
            raise RenderRefused("the decoded pixel data is too long for Explicit VR "
                                "Little Endian")
        sink.write(chunk)
    if length != native_length(ds):
        raise ValueError(f"decoded {length} bytes where the header describes "
                         f"{native_length(ds)}")
    if length % 2:
        sink.write(b"\x00")
        length += 1
    end = sink.tell()
    sink.seek(length_at)
    sink.write(struct.pack("<I", length))
    sink.seek(end)
    if len(tail):
        writer = DicomFileLike(sink)
        writer.is_little_endian, writer.is_implicit_VR = True, False
        write_dataset(writer, tail)


def _little_endian_bytes(array: np.ndarray[Any, Any]) -> bytes:
    return np.ascontiguousarray(array.astype(array.dtype.newbyteorder("<"),
                                             copy=False)).tobytes()


def native_frames(source: StoredFile | bytes, numbers: list[int]) -> list[bytes]:
    """Frames (1-based) decoded to native little endian bytes, colour as stored (PS3.18
    8.7.3.3.1: uncompressed bulk data, the default for ``application/octet-stream``).

    Raises
    ------
    RenderRefused
        When a frame cannot be decoded.
    """
    data = source if isinstance(source, bytes) else source.read()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ds = pydicom.dcmread(io.BytesIO(data))
        syntax = str(ds.file_meta.get("TransferSyntaxUID", ""))
        decoded: dict[int, bytes] = {}
        try:
            for number in dict.fromkeys(numbers):
                decoded[number] = _frame(ds, syntax, number - 1)
        except MemoryError:
            raise
        except Exception as exc:  # every decoder has its own errors: all mean "cannot decode"
            plain = dcmtk_decompressed(data, syntax)
            if plain is None:
                name = pydicom.uid.UID(syntax).name if syntax else "unknown transfer syntax"
                raise RenderRefused(f"the pixel data ({name}) cannot be decoded: "
                                    f"{exc.__class__.__name__}") from exc
            return native_frames(plain, numbers)
    return [decoded[number] for number in numbers]


def _frame(ds: Dataset, syntax: str, index: int) -> bytes:
    decoder = get_decoder(syntax)
    preferred = PREFERRED_DECODERS.get(syntax, "")
    try:
        array, _ = decoder.as_array(ds, index=index, raw=True, decoding_plugin=preferred)
    except (RuntimeError, ValueError):
        if not preferred:
            raise
        array, _ = decoder.as_array(ds, index=index, raw=True)
    return _as_described(ds, array)


def _as_described(ds: Dataset, array: np.ndarray[Any, Any]) -> bytes:
    """A decoded frame laid out as the instance's metadata describes native pixel data
    (PS3.5 8.1.1, PS3.3 C.7.6.3.1.2), which is what a client reads it by: single bits packed,
    colour by the Planar Configuration, YBR_FULL_422 as two luminance samples and one
    chrominance pair per two pixels (each pair the mean of the two decoded ones)."""
    if int(ds.BitsAllocated) == 1:
        return bytes(pack_bits(array.ravel(), pad=False))
    if array.ndim < 3 or int(ds.get("SamplesPerPixel", 1)) < 3:
        return _little_endian_bytes(array)
    if str(ds.get("PhotometricInterpretation", "")) == "YBR_FULL_422" and \
            array.shape[1] % 2 == 0:
        pairs = array.reshape(array.shape[0], array.shape[1] // 2, 2, 3).astype(np.uint32)
        chroma = (pairs[:, :, 0, 1:] + pairs[:, :, 1, 1:] + 1) // 2
        packed = np.concatenate([pairs[:, :, :, 0], chroma], axis=2).astype(array.dtype)
        return _little_endian_bytes(packed)
    if int(ds.get("PlanarConfiguration", 0)) == 1:
        return _little_endian_bytes(array.transpose(2, 0, 1))
    return _little_endian_bytes(array)
