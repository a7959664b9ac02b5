"""Builds the native fetch options for a URL from hubfast's settings and the
environment that pip and requests users expect (CA bundles, proxies)."""
from __future__ import annotations

import os
import urllib.parse
import urllib.request
from typing import Any, Dict, List, Optional

from . import config

CA_BUNDLE_ENVS = ("REQUESTS_CA_BUNDLE", "CURL_CA_BUNDLE", "SSL_CERT_FILE")


def ca_bundle() -> str:
    """The CA bundle requests would use; empty: the system store."""
    for name in CA_BUNDLE_ENVS:
        value = os.environ.get(name)
        if value:
            return value
    return ""


def proxy_for(url: str) -> str:
    """The proxy requests would use for `url` (http_proxy/https_proxy, no_proxy), or ""."""
    parts = urllib.parse.urlsplit(url)
    proxies = urllib.request.getproxies_environment()
    proxy = proxies.get(parts.scheme) or proxies.get("all") or ""
    if proxy and parts.hostname and urllib.request.proxy_bypass_environment(
            parts.hostname if parts.port is None else f"{parts.hostname}:{parts.port}"):
        return ""
    return proxy


def fetch_options(url: str, headers: Optional[List[str]] = None,
                  settings: Optional[config.Settings] = None) -> Dict[str, Any]:
    s = settings or config.settings()
    return {
        "headers": list(headers or []),
        "ca_bundle": ca_bundle(),
        "verify_tls": s.verify_tls,
        "proxy": proxy_for(url),
        "connect_timeout": s.connect_timeout,
        "low_speed_time": s.stall_timeout,
        "max_retries": s.max_retries,
        "connections": s.connections,
        "user_agent": f"hubfast/{_version()}",
    }


def _version() -> str:
    from . import __version__

    return __version__
