"""Where a URL is actually fetched from: user mirrors and endpoint overrides.

Two rewrites, applied to the URL a resolver computed (after tensorflow_hub's
query parameter or the China-mirror rule), never to the handle: the cache
entry stays ``sha1(original handle)``, so caches filled through a mirror are
the same caches tensorflow_hub and unmirrored hubfast processes use.

1. ``HUBFAST_MIRRORS``: ``prefix=replacement`` pairs (comma-separated). The
   longest matching prefix of the URL is replaced, once. A ``gs://`` handle is
   matched as ``gs://bucket/object`` first and, when no prefix matched, as its
   HTTPS form ``https://storage.googleapis.com/bucket/object``. The result must
   be an ``http(s)://`` URL.
2. Endpoint overrides (``HUBFAST_ENDPOINT_TFHUB``/``_KAGGLE``/``_GCS``/``_CN``):
   a URL on one of the public hosts (any scheme, default port) gets the
   override's scheme, host, port and path prefix; path and query are kept.
"""
from __future__ import annotations

import urllib.parse
from typing import Dict, Optional, Tuple

from . import config

# The public hosts each endpoint override stands in for.
PUBLIC_HOSTS: Dict[str, Tuple[str, ...]] = {
    "tfhub": ("tfhub.dev",),
    "kaggle": ("www.kaggle.com", "kaggle.com"),
    "gcs": ("storage.googleapis.com",),
    "cn": ("hub.tensorflow.google.cn", "gcs.tensorflow.google.cn"),
}
GCS_HOST = "storage.googleapis.com"
_DEFAULT_PORTS = {"http": 80, "https": 443}

Origin = Tuple[str, str, int]


def origin(url: str) -> Optional[Origin]:
    """(scheme, host, port) of an http(s) URL, lower-cased, default ports filled in."""
    try:
        parts = urllib.parse.urlsplit(url)
        port = parts.port
    except ValueError:
        return None
    scheme = parts.scheme.lower()
    if scheme not in _DEFAULT_PORTS or not parts.hostname:
        return None
    return scheme, parts.hostname.lower(), port if port is not None else _DEFAULT_PORTS[scheme]


def service_of(url: str) -> Optional[str]:
    """The public service ("tfhub", "kaggle", "gcs", "cn") whose host `url` names, or None."""
    o = origin(url)
    if o is None or o[2] != _DEFAULT_PORTS[o[0]]:
        return None
    for service, hosts in PUBLIC_HOSTS.items():
        if o[1] in hosts:
            return service
    return None


def endpoint(service: str, s: Optional[config.Settings] = None) -> Optional[str]:
    """The override for `service`, validated, or None."""
    s = s or config.settings()
    for name, value in s.endpoints:
        if name == service:
            if origin(value) is None:
                raise ValueError(f"{config.ENDPOINT_ENVS[service]}={value!r} is not an "
                                 "http(s)://host[:port][/prefix] URL")
            return value
    return None


def service_origins(service: str, s: Optional[config.Settings] = None) -> Tuple[Origin, ...]:
    """The origins that serve `service`: its public hosts over https, and its override."""
    out = [("https", host, 443) for host in PUBLIC_HOSTS[service]]
    override = endpoint(service, s)
    if override is not None:
        out.append(origin(override))  # type: ignore[arg-type]
    return tuple(out)


def gs_to_https(gs_url: str) -> str:
    """``gs://bucket/a b/m.tar.gz`` -> ``https://storage.googleapis.com/bucket/a%20b/m.tar.gz``."""
    if not gs_url.startswith("gs://"):
        raise ValueError(f"not a gs:// URL: {gs_url}")
    bucket, _, obj = gs_url[len("gs://"):].partition("/")
    if not bucket or not obj:
        raise ValueError(f"{gs_url}: a gs:// handle needs a bucket and an object name")
    return f"https://{GCS_HOST}/{bucket}/{urllib.parse.quote(obj, safe='/')}"


def _apply_user(url: str, pairs: tuple) -> Tuple[str, bool]:
    best: Optional[Tuple[str, str]] = None
    for prefix, replacement in pairs:
        if prefix and url.startswith(prefix) and (best is None or len(prefix) > len(best[0])):
            best = (prefix, replacement)
    if best is None:
        return url, False
    return best[1] + url[len(best[0]):], True


def _apply_endpoint(url: str, s: config.Settings) -> str:
    service = service_of(url)
    if service is None:
        return url
    override = endpoint(service, s)
    if override is None:
        return url
    parts = urllib.parse.urlsplit(url)
    rest = url.split("://", 1)[1][len(parts.netloc):]  # path, query, fragment, as given
    return override.rstrip("/") + rest


def rewrite(url: str, s: Optional[config.Settings] = None) -> str:
    """The URL to fetch for `url` (an http(s) or gs:// URL) after mirrors and overrides."""
    s = s or config.settings()
    out, hit = _apply_user(url, s.mirrors)
    if out.startswith("gs://"):
        out = gs_to_https(out)
        if not hit:
            out, hit = _apply_user(out, s.mirrors)
    if hit and origin(out) is None:
        raise ValueError(f"{config.MIRRORS_ENV}: {url} was rewritten to {out}, which is not "
                         "an http(s):// URL")
    return _apply_endpoint(out, s)
