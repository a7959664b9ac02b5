"""``gs://`` archives over HTTPS, with google-auth credentials when available.

tensorflow_hub reads ``gs://bucket/m.tar.gz`` with ``tf.io.gfile``; hubfast
fetches ``https://storage.googleapis.com/bucket/m.tar.gz`` (or
``HUBFAST_ENDPOINT_GCS``) through its native pipeline, so no TensorFlow is
needed to fill the cache. Public objects need no credentials. Private ones
need the ``google-auth`` package and Application Default Credentials
(``GOOGLE_APPLICATION_CREDENTIALS``, ``gcloud auth application-default
login``, or the metadata server on Google Cloud); the bearer token goes to the
GCS host only, never to a mirror or the host of a redirect.

``HUBFAST_GCS_AUTH``: ``auto`` (default) asks google-auth only when credentials
are plausibly configured (so a laptop without them does not wait for the GCE
metadata server to time out); ``on`` always asks; ``off`` never does.
"""
from __future__ import annotations

import logging
import os
import threading
from typing import Any, List, Optional, Tuple

from . import config, mirrors

logger = logging.getLogger("hubfast")

READ_SCOPE = "https://www.googleapis.com/auth/devstorage.read_only"
_SIGNED_QUERY_KEYS = ("x-goog-signature", "x-amz-signature", "signature")

_lock = threading.Lock()
_cached: Optional[Tuple[Tuple[Any, ...], Any]] = None  # (key, credentials or None)


def _adc_file(g: config.GoogleEnv) -> str:
    root = g.cloudsdk_config or os.path.join(os.path.expanduser("~"), ".config", "gcloud")
    return os.path.join(root, "application_default_credentials.json")


def _on_google_cloud(g: config.GoogleEnv) -> bool:
    if g.on_google_cloud:
        return True
    try:  # Compute Engine and GKE nodes (google-auth's own residency check)
        with open("/sys/class/dmi/id/product_name") as f:
            return f.read().strip().startswith("Google")
    except OSError:
        return False


def _plausibly_configured(g: config.GoogleEnv) -> bool:
    return bool(g.credentials) or os.path.exists(_adc_file(g)) or _on_google_cloud(g)


def _load_credentials(mode: str, g: config.GoogleEnv) -> Any:
    if mode not in ("auto", "on", "off"):
        raise ValueError(f"{config.GCS_AUTH_ENV}={mode!r}: expected auto, on or off")
    if mode == "off" or (mode == "auto" and not _plausibly_configured(g)):
        return None
    try:
        import google.auth
    except ImportError:
        if mode == "on":
            logger.warning("hubfast: %s=on but the google-auth package is not installed; "
                           "fetching gs:// objects anonymously", config.GCS_AUTH_ENV)
        return None
    try:
        creds, _ = google.auth.default(scopes=[READ_SCOPE])
    except Exception as e:  # DefaultCredentialsError, a malformed credentials file...
        log = logger.warning if g.credentials or mode == "on" else logger.debug
        log("hubfast: no usable Google credentials (%s); fetching gs:// objects anonymously", e)
        return None
    return creds


def _transport_request() -> Any:
    try:
        import google.auth.transport.requests as transport

        return transport.Request()
    except ImportError:
        import google.auth.transport.urllib3 as transport3
        import urllib3

        return transport3.Request(urllib3.PoolManager())


def access_token(s: Optional[config.Settings] = None) -> Optional[str]:
    """A current OAuth2 access token for GCS, or None (anonymous)."""
    global _cached
    s = s or config.settings()
    g = config.google_env()
    key = (s.gcs_auth, g)
    with _lock:
        if _cached is None or _cached[0] != key:
            _cached = (key, _load_credentials(s.gcs_auth, g))
        creds = _cached[1]
        if creds is None:
            return None
        try:
            if not creds.valid:
                creds.refresh(_transport_request())
        except Exception as e:  # RefreshError, TransportError, a missing transport
            logger.warning("hubfast: could not refresh Google credentials (%s); "
                           "fetching gs:// objects anonymously", e)
            return None
        return creds.token or None


def _is_signed(url: str) -> bool:
    import urllib.parse

    query = urllib.parse.urlsplit(url).query.lower()
    return any(f"{k}=" in query for k in _SIGNED_QUERY_KEYS)


def may_authenticate(handle: str, url: str, s: Optional[config.Settings] = None) -> bool:
    """Whether fetching `handle` from `url` would ask google-auth for a token."""
    s = s or config.settings()
    if not handle.startswith("gs://") or _is_signed(url) or s.gcs_auth == "off":
        return False
    return mirrors.origin(url) in mirrors.service_origins("gcs", s)


def auth_headers(handle: str, url: str, s: Optional[config.Settings] = None) -> List[str]:
    """``Authorization: Bearer ...`` for a ``gs://`` handle fetched from the GCS origin (or
    ``HUBFAST_ENDPOINT_GCS``), when google-auth has credentials; otherwise none."""
    s = s or config.settings()
    if not may_authenticate(handle, url, s):
        return []
    token = access_token(s)
    return [f"Authorization: Bearer {token}"] if token else []


HINT = ("GCS answered 401/403: the object is private. Install google-auth "
        "(pip install google-auth) and configure Application Default Credentials "
        "(GOOGLE_APPLICATION_CREDENTIALS or `gcloud auth application-default login`)")
