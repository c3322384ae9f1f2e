"""Class labels: reading a labels file, and turning a client's target (an index or a label) into a
class index."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

from service.errors import InvalidArgument


class LabelsFileError(ValueError):
    """A labels file that cannot be read or holds the wrong kind of data."""


# What a labels file must look like, so that a mistyped path (``/etc/passwd``, a binary) is refused
# rather than served: labels are shown to every caller of /models and /predict.
LABEL_SUFFIXES = (".txt", ".json", ".labels")
MAX_LABELS_BYTES = 4 * 1024 * 1024  # ImageNet-21k's 21,841 names take about 0.5 MB
MAX_LABEL_CHARS = 256


def read_labels(path: str | Path) -> list[str]:
    """A JSON list of strings, or one label per non-empty line, from a ``.txt``, ``.json`` or
    ``.labels`` file of at most 4 MiB of UTF-8 text; each label at most 256 characters, with no
    control characters."""
    path = Path(path)
    if path.suffix.lower() not in LABEL_SUFFIXES:
        raise LabelsFileError(f"labels file {path.name!r} must end in {', '.join(LABEL_SUFFIXES)}")
    try:
        if path.stat().st_size > MAX_LABELS_BYTES:
            raise LabelsFileError(f"labels file {path.name!r} is larger than {MAX_LABELS_BYTES} bytes")
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise LabelsFileError(f"labels file {path.name!r} is not UTF-8 text") from None
    except OSError as exc:
        raise LabelsFileError(f"cannot read labels file {path.name!r}: {exc.strerror or exc}") from None
    labels = _parse(text, path.name)
    for i, label in enumerate(labels):
        if len(label) > MAX_LABEL_CHARS or any(ord(c) < 32 or ord(c) == 127 for c in label):
            raise LabelsFileError(f"labels file {path.name!r}: label {i} is longer than {MAX_LABEL_CHARS} "
                                  "characters or holds control characters")
    return labels


def _parse(text: str, name: str) -> list[str]:
    if text.lstrip().startswith("["):
        try:
            labels = json.loads(text)
        except ValueError as exc:
            raise LabelsFileError(f"labels file {name!r} is not valid JSON: {exc}") from None
        if not isinstance(labels, list) or not all(isinstance(x, str) for x in labels):
            raise LabelsFileError(f"labels file {name!r} must hold a JSON list of strings")
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
