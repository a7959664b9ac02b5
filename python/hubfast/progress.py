"""Download/extract progress: a tqdm bar when stderr is a terminal or
TFHUB_DOWNLOAD_PROGRESS is set; silent otherwise."""
from __future__ import annotations

import sys
from typing import Callable, Optional

ProgressFn = Callable[[int, int, int], None]


class _Bar:
    def __init__(self, desc: str) -> None:
        from tqdm.auto import tqdm  # optional dependency: hubfast[progress]

        self._bar = tqdm(desc=desc, unit="B", unit_scale=True, unit_divisor=1024,
                         leave=False, file=sys.stderr)
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
