"""Splitting multipart/related bodies (portal/multipart.py) as RFC 2046 5.1.1 delimits them."""

from __future__ import annotations

import pytest

from portal.multipart import MultipartError, split_parts


def test_the_boundary_followed_by_other_bytes_is_data_and_padding_is_allowed() -> None:
    first = b"one\r\n--bndX is not a delimiter, nor \r\n--bnd2"
    body = (b"--bnd\r\nContent-Type: application/dicom\r\n\r\n" + first +
            b"\r\n--bnd \t\r\nContent-Type: application/dicom\r\n\r\ntwo\r\n--bnd--\r\n")
    parts = split_parts(body, "bnd")
    assert [bytes(p.payload) for p in parts] == [first, b"two"]


def test_a_part_only_closed_by_a_boundary_with_other_bytes_is_not_terminated() -> None:
    body = b"--bnd\r\nContent-Type: application/dicom\r\n\r\ndata\r\n--bndX\r\n"
    with pytest.raises(MultipartError, match="not terminated"):
        split_parts(body, "bnd")


def test_a_preamble_holding_the_boundary_with_other_bytes_is_skipped() -> None:
    body = (b"preamble --bndX\r\n--bnd\r\nContent-Type: application/dicom\r\n\r\none"
            b"\r\n--bnd--\r\n")
    assert [bytes(p.payload) for p in split_parts(body, "bnd")] == [b"one"]
    with pytest.raises(MultipartError, match="does not contain the boundary"):
        split_parts(b"--bndX\r\nContent-Type: a/b\r\n\r\nx\r\n--bndX--", "bnd")
