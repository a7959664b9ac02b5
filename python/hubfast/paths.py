"""``file://`` URLs as local paths, wherever tensorflow_hub accepts a path.

tensorflow_hub hands paths to ``tf.io.gfile``, which takes ``file:///abs/path``
as ``/abs/path``; hubfast's cache and loader use the operating system's calls,
so every path a user gives (``TFHUB_CACHE_DIR``, a handle, an export
directory) goes through :func:`local_path` first.
"""
from __future__ import annotations

import os
import urllib.parse
import urllib.request
from typing import Union

FILE_SCHEME = "file://"


def is_file_url(path: str) -> bool:
    return path[:len(FILE_SCHEME)].lower() == FILE_SCHEME


def local_path(path: Union[str, "os.PathLike[str]"]) -> str:
    """`path` with a ``file://`` URL turned into the local path it names; others unchanged.

    ``file:///abs/path`` and ``file://localhost/abs/path`` name ``/abs/path``
    (percent-escapes decoded). A URL with another host names no local file:
    ``ValueError`` (TensorFlow would silently drop the host, so
    ``file://relative/dir`` would mean ``/dir``).
    """
    path = os.fspath(path)
    if not is_file_url(path):
        return path
    parts = urllib.parse.urlsplit(path)
    if parts.netloc not in ("", "localhost"):
        raise ValueError(f"{path!r} names host {parts.netloc!r}: a file:// URL must name a "
                         "local absolute path, as file:///abs/path")
    if parts.query or parts.fragment:
        raise ValueError(f"{path!r}: a file:// path takes no query or fragment")
    return urllib.request.url2pathname(parts.path)
