"""The Accept header as DICOMweb clients send it (RFC 9110 12.5.1, PS3.18 8.7).

Real clients do not always quote the ``type`` parameter of ``multipart/related``: the
Cornerstone WADO-RS image loader that OHIF uses sends
``multipart/related; type=application/octet-stream; transfer-syntax=*``. A strict RFC 2045
parser cuts that value at the ``/`` (werkzeug's gives ``type=application``), so media ranges
are split here by hand: ``,`` between ranges and ``;`` between parameters (outside quotes),
values unquoted, ranges ordered by ``q`` (those with ``q=0`` dropped; a header of such ranges
only accepts nothing: ``NOTHING``).
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class MediaRange:
    """One media range: its type (lower case) and parameters (names lower case)."""

    media_type: str
    params: dict[str, str] = field(default_factory=dict)

    @property
    def part_type(self) -> str:
        """The media type of the parts: ``type`` of a multipart range, else the type itself."""
        if self.media_type in ("multipart/related", "multipart/*"):
            return self.params.get("type", "").lower()
        return self.media_type

    @property
    def transfer_syntax(self) -> str:
        """The ``transfer-syntax`` parameter ("" when absent)."""
        return self.params.get("transfer-syntax", "")


# What a header whose every range has ``q=0`` stands for: nothing is acceptable (RFC 9110
# 12.4.2), where no header at all accepts anything. It is no media type, so it matches none.
NOTHING = MediaRange("")


def _split(text: str, separator: str) -> list[str]:
    """Split on ``separator`` outside double quotes."""
    items: list[str] = []
    current: list[str] = []
    quoted = False
    for char in text:
        if char == '"':
            quoted = not quoted
        if char == separator and not quoted:
            items.append("".join(current))
            current = []
        else:
            current.append(char)
    items.append("".join(current))
    return items


def parse_media_type(header: str) -> MediaRange:
    """A Content-Type value, read as leniently as the Accept header (``type`` unquoted)."""
    pieces = _split(header[:4096], ";")
    params = {}
    for piece in pieces[1:]:
        name, sep, value = piece.partition("=")
        if sep:
            params[name.strip().lower()] = value.strip().strip('"')
    return MediaRange(pieces[0].strip().lower(), params)


def parse_accept(header: str) -> list[MediaRange]:
    """The media ranges of an Accept header, most preferred first (an empty header: none;
    one that refuses every range it names: ``[NOTHING]``)."""
    ranked: list[tuple[float, int, MediaRange]] = []
    named = False
    for index, text in enumerate(_split(header[:4096], ",")):
        pieces = _split(text, ";")
        media_type = pieces[0].strip().lower()
        if not media_type:
            continue
        named = True
        params: dict[str, str] = {}
        quality = 1.0
        for piece in pieces[1:]:
            name, sep, value = piece.partition("=")
            if not sep:
                continue
            name, value = name.strip().lower(), value.strip().strip('"').strip()
            if name == "q":
                try:
                    quality = float(value)
                except ValueError:
                    quality = 0.0
                continue
            params[name] = value
        if quality > 0:
            ranked.append((-quality, index, MediaRange(media_type, params)))
    if named and not ranked:
        return [NOTHING]
    return [media_range for _q, _i, media_range in sorted(ranked, key=lambda r: r[:2])]
