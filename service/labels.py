"""Class labels: reading a labels file, and turning a client's target (an index or a label) into a
class index."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

from service.errors import InvalidArgument


class LabelsFileError(ValueError):
    """A labels file that cannot be read or holds the wrong kind of data."""


def read_labels(path: str | Path) -> list[str]:
    """A JSON list of strings, or one label per non-empty line."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except OSError as exc:
        raise LabelsFileError(f"cannot read labels file {str(path)!r}: {exc.strerror or exc}") from None
    if text.lstrip().startswith("["):
        try:
            labels = json.loads(text)
        except ValueError as exc:
            raise LabelsFileError(f"labels file {str(path)!r} is not valid JSON: {exc}") from None
        if not isinstance(labels, list) or not all(isinstance(x, str) for x in labels):
            raise LabelsFileError(f"labels file {str(path)!r} must hold a JSON list of strings")
        return labels
    return [line.strip() for line in text.splitlines() if line.strip()]


def is_index(text: str) -> bool:
    """A class index written as text: ASCII digits only ("²".isdigit() is true), and short enough
    that ``int()`` cannot hit Python's digit limit."""
    return text.isascii() and text.isdigit() and len(text) <= 9


def class_index(labels: Sequence[str], target: int | str) -> int:
    """The class a target names: an index in range, or a label (a label wins over a digit string)."""
    k = len(labels)
    if isinstance(target, int) and not isinstance(target, bool):
        if not 0 <= target < k:
            raise InvalidArgument("targets", f"target class index must be in 0..{k - 1}, got {target}")
        return target
    if isinstance(target, str):
        if target in labels:
            return list(labels).index(target)
        if is_index(target):
            return class_index(labels, int(target))
    raise InvalidArgument("targets", f"unknown target class {target!r}; use an index in 0..{k - 1} or a label")
