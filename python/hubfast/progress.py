"""Download/extract progress: a tqdm bar when stderr is a terminal or
TFHUB_DOWNLOAD_PROGRESS is set; silent otherwise."""
from __future__ import annotations

import os
import sys
import urllib.parse
from typing import Callable, Optional

ProgressFn = Callable[[int, int, int], None]


def label(handle: str, width: int = 40) -> str:
    """The handle as a progress-bar label: the last path components that fit in `width`
    (a URL's scheme, host and query are left out: the tail names the model), ".../" before
    them when some were left out."""
    parsed = urllib.parse.urlsplit(handle)
    path = parsed.path if parsed.scheme else handle
    parts = [p for p in path.split("/") if p] or [handle]
    tail = parts[-1]
    for part in reversed(parts[:-1]):
        if len(part) + 1 + len(tail) > width - 4:
            break
        tail = part + "/" + tail
    if len(tail) > width - 4:  # one component longer than the bar's label: its end
        tail = tail[-(width - 4):]
    return tail if tail == "/".join(parts) else ".../" + tail


def _fixed_size() -> dict:
    """{} (tqdm follows the terminal) unless the terminal reports no size, as a fresh
    pseudo-terminal or a serial console does: then tqdm would draw nothing at all."""
    try:
        size = os.get_terminal_size(sys.stderr.fileno())
    except (OSError, ValueError, AttributeError):
        return {}
    return {} if size.columns > 0 and size.lines > 0 else {"ncols": 80, "nrows": 24}


class _Bar:
    def __init__(self, desc: str) -> None:
        from tqdm.auto import tqdm  # optional dependency: hubfast[progress]

        self._bar = tqdm(desc=desc, unit="B", unit_scale=True, unit_divisor=1024,
                         leave=False, file=sys.stderr, **_fixed_size())
        self._seen = 0

    def __call__(self, bytes_in: int, total_in: int, bytes_out: int) -> None:
        if total_in > 0 and self._bar.total != total_in:
            self._bar.total = total_in
        if bytes_in > self._seen:
            self._bar.update(bytes_in - self._seen)
            self._seen = bytes_in

    def close(self) -> None:
        self._bar.close()


def make_progress(desc: str, enabled: bool) -> Optional[_Bar]:
    """A progress callback for the native core, or None when silent."""
    if not (enabled or sys.stderr.isatty()):
        return None
    try:
        return _Bar(desc)
    except ImportError:
        return None
