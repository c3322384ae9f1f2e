"""``Accept`` header negotiation (RFC 9110, section 12.5.1), for routes that can answer in more than one
media type.

Each offer gets the quality of the most specific range that matches it (``image/png`` before
``image/*`` before ``*/*``); ``q=0`` refuses it. The best quality wins, and ties go to the server's
order of preference. No ``Accept`` header (or an empty one) accepts anything. Media-type parameters
other than ``q`` are ignored, as are entries that cannot be parsed.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass


@dataclass(frozen=True)
class MediaRange:
    type: str
    subtype: str
    q: float

    def specificity(self, media_type: str) -> int:
        """2 exact, 1 ``type/*``, 0 ``*/*``; -1 when this range does not match ``media_type``."""
        kind, _, sub = media_type.partition("/")
        if self.type == "*":
            return 0 if self.subtype == "*" else -1
        if self.type != kind:
            return -1
        if self.subtype == "*":
            return 1
        return 2 if self.subtype == sub else -1


def parse_accept(header: str) -> list[MediaRange]:
    ranges = []
    for part in header.split(","):
        fields = [f.strip() for f in part.split(";")]
        kind, slash, sub = fields[0].lower().partition("/")
        if not slash or not kind or not sub or (kind == "*" and sub != "*"):
            continue
        q = 1.0
        for param in fields[1:]:
            name, _, value = param.partition("=")
            if name.strip().lower() == "q":
                try:
                    q = float(value.strip())
                except ValueError:
                    q = -1.0
        if 0.0 <= q <= 1.0:
            ranges.append(MediaRange(kind, sub, q))
    return ranges


def quality(ranges: Sequence[MediaRange], media_type: str) -> float:
    """How much the client wants ``media_type``: the q of the most specific matching range, else 0."""
    best, q = -1, 0.0
    for r in ranges:
        s = r.specificity(media_type)
        if s > best:
            best, q = s, r.q
        elif s == best and s >= 0:
            q = max(q, r.q)  # the same range listed twice: the kinder reading
    return q


def choose(header: str | None, offers: Sequence[str]) -> str | None:
    """The offer to answer with, in the server's order of preference on ties; ``None`` when the
    client accepts none of them (a 406)."""
    if header is None or not header.strip():
        return offers[0] if offers else None
    ranges = parse_accept(header)
    if not ranges:  # nothing parseable: treat as no preference rather than refuse
        return offers[0] if offers else None
    scored = [(quality(ranges, o), -i, o) for i, o in enumerate(offers)]
    best = max(scored, default=None)
    return best[2] if best is not None and best[0] > 0 else None
