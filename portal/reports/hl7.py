"""HL7 v2 messages: parse, decode escapes, and build acknowledgements (HL7 v2.5.1 ch. 2).

A message is a list of segments split on CR; the MSH segment declares the field separator
(MSH-1) and the encoding characters (MSH-2: component, repetition, escape, subcomponent).
Only what the portal reads is modelled: ``Message.field("OBR", 25)`` gives a field's text,
``components`` its parts. Nothing here touches the database.
"""

from __future__ import annotations

import re
import secrets
import unicodedata
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta, tzinfo

from portal import failures

# HL7 character sets (MSH-18) we decode; an empty MSH-18 means the sender's default, which
# we take to be UTF-8 (ASCII is a subset).
CHARSETS = {"": "utf-8", "ASCII": "ascii", "UNICODE UTF-8": "utf-8", "8859/1": "latin-1",
            "8859/15": "iso8859-15", "UNICODE": "utf-8"}


class MessageRejected(failures.Invalid, ValueError):
    """The message cannot be read at all (answer AR with ``reason``)."""

    def __init__(self, reason: str, control_id: str = "") -> None:
        super().__init__(reason)
        self.reason = reason
        self.control_id = control_id


@dataclass(frozen=True)
class Delimiters:
    """MSH-1 and MSH-2."""

    field: str = "|"
    component: str = "^"
    repetition: str = "~"
    escape: str = "\\"
    subcomponent: str = "&"


def _delimiters(header: str) -> Delimiters:
    if not header.startswith("MSH") or len(header) < 8:
        raise MessageRejected("the message does not start with an MSH segment")
    field = header[3]
    encoding = header[4:8]
    chosen = field + encoding
    # After the four encoding characters comes MSH-3's separator (or, from v2.7, a fifth
    # "truncation" character and then the separator).
    follows = header[8:9] == field or (header[8:9] not in ("", field) and header[9:10] == field)
    if field.isalnum() or field in " \r\n" or len(set(chosen)) != 5 or not follows \
            or any(c.isalnum() or c in " \r\n" for c in encoding):
        raise MessageRejected("MSH-1 and MSH-2 do not declare valid, distinct delimiters")
    return Delimiters(field, encoding[0], encoding[1], encoding[2], encoding[3])


def _charset(raw: bytes, field: str) -> str:
    """The Python codec named by MSH-18 (read from the ASCII header)."""
    first = raw.split(b"\r", 1)[0].decode("ascii", errors="replace")
    parts = first.split(field)
    declared = parts[17].split("~")[0].strip().upper() if len(parts) > 17 else ""
    if declared not in CHARSETS:
        raise MessageRejected(f"character set {declared[:20]!r} in MSH-18 is not supported")
    return CHARSETS[declared]


class Message:
    """A parsed HL7 v2 message."""

    def __init__(self, text: str, delimiters: Delimiters, zone: tzinfo = UTC) -> None:
        self.delimiters = delimiters
        # Where a time without an offset is (``parse_timestamp``): the sender's local time,
        # which HL7 v2.5 2.A.22 gives as the default; the practice's zone (PORTAL_TIMEZONE).
        self.zone = zone
        self.segments: list[list[str]] = []
        for line in re.split(r"\r\n|\r|\n", text):
            if not line.strip():
                continue
            if line.startswith("MSH"):
                # MSH-1 is the separator itself: keep numbering as the standard does.
                fields = ["MSH", delimiters.field, *line[4:].split(delimiters.field)]
                fields[2] = fields[2] if len(fields) > 2 else ""
            else:
                fields = line.split(delimiters.field)
            self.segments.append(fields)

    def all(self, name: str) -> list[list[str]]:
        """Every segment with this name, in order."""
        return [s for s in self.segments if s[0] == name]

    def first(self, name: str) -> list[str] | None:
        """The first segment with this name, or None."""
        found = self.all(name)
        return found[0] if found else None

    @staticmethod
    def raw(segment: list[str] | None, number: int) -> str:
        """Field ``number`` (1-based, as in the standard) of a segment, unparsed."""
        if segment is None or number >= len(segment):
            return ""
        return segment[number]

    def components(self, segment: list[str] | None, number: int,
                   repetition: int = 0) -> list[str]:
        """The components of one repetition of a field, unescaped."""
        value = self.raw(segment, number)
        if segment is not None and segment[0] == "MSH" and number in (1, 2):
            return [value]
        repetitions = value.split(self.delimiters.repetition)
        if repetition >= len(repetitions):
            return []
        return [self.unescape(c) for c in repetitions[repetition].split(
            self.delimiters.component)]

    def text(self, segment: list[str] | None, number: int, component: int = 1) -> str:
        """One component (1-based) of a field's first repetition, unescaped."""
        parts = self.components(segment, number)
        text = parts[component - 1] if component - 1 < len(parts) else ""
        return text.split(self.delimiters.subcomponent)[0] if component > 0 else text

    def repetitions(self, segment: list[str] | None, number: int) -> list[str]:
        """Every repetition of a field as unescaped text (components joined by spaces)."""
        value = self.raw(segment, number)
        out = []
        for repetition in value.split(self.delimiters.repetition) if value else []:
            out.append(self.unescape(repetition))
        return out

    def unescape(self, value: str) -> str:
        """Decode HL7 escape sequences (v2.5.1 2.7): \\F\\ \\S\\ \\T\\ \\R\\ \\E\\, \\.br\\,
        \\Xhh..\\ (hex bytes as UTF-8); formatting commands and unknown ones are dropped."""
        d = self.delimiters
        if d.escape not in value:
            return value
        out: list[str] = []
        i = 0
        while i < len(value):
            char = value[i]
            if char != d.escape:
                out.append(char)
                i += 1
                continue
            end = value.find(d.escape, i + 1)
            if end < 0:
                out.append(value[i:])
                break
            code = value[i + 1:end]
            i = end + 1
            simple = {"F": d.field, "S": d.component, "T": d.subcomponent,
                      "R": d.repetition, "E": d.escape, ".br": "\n"}
            if code in simple:
                out.append(simple[code])
            elif code.startswith("X") and re.fullmatch(r"X([0-9A-Fa-f]{2})+", code):
                out.append(bytes.fromhex(code[1:]).decode("utf-8", errors="replace"))
            # \.sp\, \.in\, \H\, \N\, \Zxx\ and the like: formatting, not text.
        return "".join(out)

    # -- the header ------------------------------------------------------------------------

    @property
    def msh(self) -> list[str]:
        """The MSH segment."""
        header = self.first("MSH")
        assert header is not None
        return header

    @property
    def message_type(self) -> tuple[str, str]:
        """(type, trigger event) from MSH-9, e.g. ("ORU", "R01")."""
        parts = [*self.components(self.msh, 9), "", ""]
        return parts[0].upper(), parts[1].upper()

    @property
    def control_id(self) -> str:
        """MSH-10."""
        return self.text(self.msh, 10)[:64]

    @property
    def sending_application(self) -> str:
        """MSH-3, first component."""
        return self.text(self.msh, 3)

    @property
    def version(self) -> str:
        """MSH-12."""
        return self.text(self.msh, 12) or "2.5.1"


def parse(raw: bytes, zone: tzinfo = UTC) -> Message:
    """Parse a message (the bytes between MLLP framing); MessageRejected when unreadable.
    ``zone``: where its times without an offset are (``Message.zone``)."""
    if not raw.lstrip().startswith(b"MSH"):
        raise MessageRejected("the message does not start with an MSH segment")
    raw = raw.lstrip()
    delimiters = _delimiters(raw[:10].decode("ascii", errors="replace"))
    control = raw.split(b"\r", 1)[0].decode("ascii", errors="replace").split(
        delimiters.field)
    control_id = control[9][:64] if len(control) > 9 else ""
    try:
        codec = _charset(raw, delimiters.field)
        text = raw.decode(codec)
    except MessageRejected as exc:
        exc.control_id = control_id
        raise
    except UnicodeDecodeError as exc:
        raise MessageRejected(
            f"the text is not valid {codec.upper()} (byte {exc.start}); declare the "
            "character set in MSH-18", control_id) from None
    message = Message(text, delimiters, zone)
    if not message.segments or message.segments[0][0] != "MSH":
        raise MessageRejected("the message does not start with an MSH segment", control_id)
    return message


def parse_timestamp(value: str, zone: tzinfo = UTC) -> datetime | None:
    """An HL7 DTM (YYYY[MM[DD[HH[MM[SS[.S]]]]]][+/-ZZZZ]) as an aware datetime in UTC, or
    None (also for one that cannot be a moment, e.g. year 1 with a positive offset). Without
    an offset it is a time in ``zone`` (the sender's local time: ``Message.zone``)."""
    match = re.fullmatch(r"(\d{4})(\d{2})?(\d{2})?(\d{2})?(\d{2})?(\d{2})?(?:\.\d+)?"
                         r"([+-]\d{4})?", value.strip())
    if not match:
        return None
    year, month, day, hour, minute, second, offset = match.groups()
    try:
        moment = datetime(int(year), int(month or 1), int(day or 1), int(hour or 0),
                          int(minute or 0), int(second or 0))
        if not offset:
            return moment.replace(tzinfo=zone).astimezone(UTC)
        sign = 1 if offset[0] == "+" else -1
        return moment.replace(tzinfo=UTC) - timedelta(
            minutes=sign * (int(offset[1:3]) * 60 + int(offset[3:5])))
    except (ValueError, OverflowError):
        return None


# The longest value an AR echoes from the MSH of a message parse() refused: HD (MSH-3 to
# MSH-6) is 227 characters in v2.5, MSH-10 keeps the 64 the portal stores, MSH-12 199.
ECHO_LIMITS = {3: 227, 4: 227, 5: 227, 6: 227, 12: 199}
CONTROL_ID_LIMIT = 64
# Control, format, private, unassigned and line or paragraph separator characters.
UNPRINTED = {"Cc", "Cf", "Cs", "Co", "Cn", "Zl", "Zp"}


def _plain(text: str) -> str:
    """``text`` with line breaks made spaces and other unprinted characters dropped."""
    text = re.sub(r"[\r\n]+", " ", text)
    return "".join(c for c in text if unicodedata.category(c) not in UNPRINTED)


def _escapes(d: Delimiters) -> dict[str, str]:
    """Each delimiter and its escape sequence (v2.5.1 2.7.1)."""
    return {d.escape: f"{d.escape}E{d.escape}", d.field: f"{d.escape}F{d.escape}",
            d.component: f"{d.escape}S{d.escape}", d.subcomponent: f"{d.escape}T{d.escape}",
            d.repetition: f"{d.escape}R{d.escape}"}


def _usable(char: str) -> bool:
    """A character a sender may use as a delimiter: printable ASCII, no letter, digit or space."""
    return char.isascii() and char.isprintable() and not char.isalnum() and char != " "


def _escaped(text: str, d: Delimiters) -> str:
    """``text`` made plain (``_plain``) with each of the delimiters ``d`` escaped."""
    escapes = _escapes(d)
    return "".join(escapes.get(c, c) for c in _plain(text))


def _trigger_code(text: str) -> str:
    """A trigger event as an ACK may echo it: three letters or digits, else nothing."""
    text = text.upper()
    return text if re.fullmatch(r"[A-Z0-9]{3}", text) else ""


def _bounded(value: str, limit: int, d: Delimiters) -> str:
    r"""``value`` cut to ``limit`` characters, never inside an escape sequence (``\F\``)."""
    if len(value) <= limit:
        return value
    cut = value[:limit]
    # An odd number of escape characters in what is kept: the last sequence is open.
    if cut.count(d.escape) % 2:
        cut = cut[:cut.rindex(d.escape)]
    return cut


def _echoed(raw: bytes) -> dict[int, str]:
    """What an AR echoes from the MSH of a message parse() refused, by field number, written
    with the ACK's delimiters (9 is MSH-9's trigger event only, 10 MSH-10 as plain text);
    empty when not even MSH-1 can be read.

    The header is read leniently: an encoding character in MSH-2 that is missing, unusable or
    repeated is taken to be the field separator, which never occurs inside a field.
    """
    # 64 KiB is far more than any real MSH and bounds the work spent on a refused message.
    line = re.split(rb"[\r\n]", raw.lstrip()[:65536], maxsplit=1)[0].decode(
        "utf-8", errors="replace")
    if not line.startswith("MSH") or len(line) < 4 or not _usable(line[3]):
        return {}
    separator = line[3]
    fields = ["MSH", separator, *line[4:].split(separator)]
    chosen = [separator]
    for char in fields[2][:4].ljust(4, separator):
        chosen.append(char if _usable(char) and char not in chosen else separator)
    reader = Message("", Delimiters(*chosen))
    ours = Delimiters()
    echoed: dict[int, str] = {}
    for number, limit in ECHO_LIMITS.items():
        value = ours.component.join(_escaped(component, ours)
                                    for component in reader.components(fields, number))
        echoed[number] = _bounded(value, limit, ours).rstrip(ours.component)
    echoed[9] = _trigger_code([*reader.components(fields, 9), "", ""][1])
    echoed[10] = _plain(reader.text(fields, 10))[:CONTROL_ID_LIMIT]
    return echoed


def acknowledgement(message: Message | None, code: str, text: str = "",
                    control_id: str = "", error_code: str = "", raw: bytes = b"") -> bytes:
    """An ACK (MSA-1 AA, AE or AR) for a message; ``message`` is None when it was unreadable.

    ``error_code`` is from HL7 table 0357 (e.g. 100 segment sequence error, 200 unsupported
    message type, 207 application internal error). Without ``message``, ``raw`` is the
    message's bytes: what of its MSH can still be read is echoed as for a parsed one (MSH-3/4
    to MSH-5/6, MSH-5/6 to MSH-3/4, MSH-10 to MSA-2 in place of ``control_id``, MSH-12).
    """
    d = message.delimiters if message is not None else Delimiters()
    now = datetime.now(UTC).strftime("%Y%m%d%H%M%S")

    def escape(value: str) -> str:
        return _bounded(_escaped(value, d), 200, d)

    if message is not None:
        # As the sender wrote them (its delimiters are the ACK's), without control bytes and
        # cut to their HL7 lengths on whole escape sequences; the trigger only as a code.
        sender_app, sender_fac, receiver_app, receiver_fac, version = (
            _bounded(_plain(message.raw(message.msh, number)), ECHO_LIMITS[number], d)
            for number in (3, 4, 5, 6, 12))
        version = version or "2.5.1"
        trigger = _trigger_code(message.message_type[1])
        control_id = control_id or message.control_id
    else:
        echoed = _echoed(raw)
        sender_app, sender_fac = echoed.get(3, ""), echoed.get(4, "")
        receiver_app, receiver_fac = echoed.get(5, ""), echoed.get(6, "")
        trigger = echoed.get(9, "")
        version = echoed.get(12) or "2.5.1"
        control_id = echoed.get(10) or control_id
    encoding = d.component + d.repetition + d.escape + d.subcomponent
    msh = d.field.join(["MSH", encoding, receiver_app or "PORTAL", receiver_fac, sender_app,
                        sender_fac, now, "", f"ACK{d.component}{trigger}{d.component}ACK",
                        f"ACK{secrets.token_hex(6)}", "P", version])
    segments = [msh, d.field.join(["MSA", code, escape(control_id), escape(text)])]
    if code != "AA":
        segments.append(d.field.join(
            ["ERR", "", "", f"{error_code or '207'}{d.component}{escape(text)}"
                            f"{d.component}HL70357", "E"]))
    return ("\r".join(segments) + "\r").encode("utf-8")
