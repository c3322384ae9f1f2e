"""Library attributes swapped process-wide while at least one explanation needs them.

Some of torchvision's and PyTorch's pieces are reached through a module global or a class attribute
(the RoI pooler, ``TwoMLPHead.forward``, ``F.interpolate``), so an explanation can only give them a cheaper
backward by swapping them for everyone. The swaps keep results and gradients equal, so another thread running
meanwhile is unaffected; a count restores the originals only when the last overlapping explanation ends.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager


class CountedPatch:
    """``swaps``: ``(owner, attribute, replacement)``; the originals are read when the patch is made."""

    def __init__(self, *swaps: tuple[object, str, object]) -> None:
        self._swaps = swaps
        self._originals = [getattr(owner, name) for owner, name, _ in swaps]
        self._lock = threading.Lock()
        self._users = 0

    @contextmanager
    def held(self) -> Iterator[None]:
        with self._lock:
            self._users += 1
            for owner, name, replacement in self._swaps:
                setattr(owner, name, replacement)
        try:
            yield
        finally:
            with self._lock:
                self._users -= 1
                if self._users == 0:
                    for (owner, name, _), original in zip(self._swaps, self._originals, strict=True):
                        setattr(owner, name, original)
