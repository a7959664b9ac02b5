"""Builds the native fetch options for a URL from hubfast's settings and the
environment that pip and requests users expect (CA bundles, proxies); the
credentials a handle's host gets (Kaggle, GCS); and the one small request made
in Python: tensorflow_hub's UNCOMPRESSED location lookup."""
from __future__ import annotations

import os
import socket
import ssl
import time
import urllib.error
import urllib.parse
import urllib.request
from typing import Any, Dict, List, Optional, Tuple

from . import config, errors

CA_BUNDLE_ENVS = ("REQUESTS_CA_BUNDLE", "CURL_CA_BUNDLE", "SSL_CERT_FILE")


# Where distributions keep their CA bundle (Debian/Ubuntu first: libcurl's own default
# there). A wheel's bundled libcurl keeps the path it was built with, which another
# distribution may not have.
SYSTEM_CA_BUNDLES = (
    "/etc/ssl/certs/ca-certificates.crt",                # Debian, Ubuntu, Alpine, Arch
    "/etc/pki/tls/certs/ca-bundle.crt",                  # Fedora, RHEL, CentOS
    "/etc/pki/ca-trust/extracted/pem/tls-ca-bundle.pem",  # RHEL 7+
    "/etc/ssl/ca-bundle.pem",                            # openSUSE
    "/etc/ssl/cert.pem",                                 # Alpine, macOS-like layouts
)


def ca_bundle() -> str:
    """The CA bundle requests would use; else the system's when libcurl's built-in
    default is not on this machine; empty: libcurl's default store."""
    for name in CA_BUNDLE_ENVS:
        value = os.environ.get(name)
        if value:
            return value
    if os.path.exists(SYSTEM_CA_BUNDLES[0]):
        return ""
    for path in SYSTEM_CA_BUNDLES[1:]:
        if os.path.exists(path):
            return path
    return ""


_PROXY_ENVS = ("http_proxy", "https_proxy", "all_proxy", "HTTP_PROXY", "HTTPS_PROXY",
               "ALL_PROXY")


def proxy_for(url: str) -> str:
    """The proxy requests would use for `url` (http_proxy/https_proxy, no_proxy), or ""."""
    if not any(os.environ.get(name) for name in _PROXY_ENVS):
        return ""  # the common case, without scanning the whole environment
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
        "adaptive_connections": s.adaptive_connections,
        "min_parallel_bytes": s.min_parallel_bytes,
        "growth_trace": s.growth_trace,
        "user_agent": f"hubfast/{_version()}",
    }


def _version() -> str:
    from . import __version__

    return __version__


def credential_headers(handle: str, url: str,
                       settings: Optional[config.Settings] = None) -> List[str]:
    """The headers carrying credentials for fetching `handle` from `url`.

    Kaggle handles get HTTP Basic auth and ``gs://`` handles a google-auth bearer
    token, each only when `url` is on that service's own origin (or its endpoint
    override). The native fetch sends headers to that origin only and drops them on
    a redirect to another scheme, host or port.
    """
    from . import gcs, kaggle

    s = settings or config.settings()
    return kaggle.auth_headers(handle, url, s) + gcs.auth_headers(handle, url, s)


class _NoRedirect(urllib.request.HTTPRedirectHandler):
    def redirect_request(self, req, fp, code, msg, headers, newurl):  # noqa: D102
        return None  # every 3xx surfaces as an HTTPError; the caller decides


def _opener(url: str, s: config.Settings) -> urllib.request.OpenerDirector:
    ctx = ssl.create_default_context(cafile=ca_bundle() or None)
    if not s.verify_tls:
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
    proxy = proxy_for(url)
    scheme = urllib.parse.urlsplit(url).scheme
    return urllib.request.build_opener(
        urllib.request.ProxyHandler({scheme: proxy} if proxy else {}),
        urllib.request.HTTPSHandler(context=ctx), _NoRedirect())


_RETRY_STATUSES = (408, 429, 500, 502, 503, 504)
_MAX_BODY = 1 << 16


def get_without_following(url: str, headers: Optional[List[str]] = None,
                          stop_at: Tuple[int, ...] = (303,),
                          settings: Optional[config.Settings] = None) -> Tuple[int, bytes, str]:
    """GETs `url` with urllib and returns ``(status, body, final_url)``.

    Redirects are followed by hand (at most 10, never https -> http) except those in
    `stop_at`, which are returned. `headers` ("Name: value") go to the origin of `url`
    only. Timeouts come from the settings; connection errors, 408, 429 and 5xx are
    retried (HUBFAST_MAX_RETRIES) with a short backoff. Bodies are capped at 64 KiB.
    """
    from . import mirrors

    s = settings or config.settings()
    timeout = max(s.connect_timeout, s.stall_timeout)
    first = mirrors.origin(url)
    current, hops, attempt = url, 0, 0
    while True:
        req = urllib.request.Request(current, headers={"User-Agent": f"hubfast/{_version()}"})
        if mirrors.origin(current) == first:
            for h in headers or []:
                name, _, value = h.partition(":")
                req.add_header(name.strip(), value.strip())
        try:
            try:
                with _opener(current, s).open(req, timeout=timeout) as resp:
                    status, body, location = resp.status, resp.read(_MAX_BODY), None
            except urllib.error.HTTPError as e:
                status, location = e.code, e.headers.get("Location") if e.headers else None
                body = e.read(_MAX_BODY) if e.fp is not None else b""
        except (socket.timeout, TimeoutError) as e:
            if attempt < s.max_retries:
                attempt += 1
                time.sleep(min(4.0, 0.25 * 2 ** attempt))
                continue
            raise errors.DownloadTimeoutError(f"{url}: no answer within {timeout:g} s ({e})")
        except urllib.error.URLError as e:
            if isinstance(e.reason, ssl.SSLError):  # certificates: retrying will not help
                raise errors.NetworkError(
                    f"{url}: TLS failed: {e.reason} (CA bundle: REQUESTS_CA_BUNDLE, "
                    "CURL_CA_BUNDLE or SSL_CERT_FILE)") from None
            if attempt < s.max_retries:
                attempt += 1
                time.sleep(min(4.0, 0.25 * 2 ** attempt))
                continue
            if isinstance(e.reason, TimeoutError):
                raise errors.DownloadTimeoutError(
                    f"{url}: could not connect within {timeout:g} s") from None
            raise errors.NetworkError(f"{url}: {e.reason}") from None
        if status in _RETRY_STATUSES and attempt < s.max_retries:
            attempt += 1
            time.sleep(min(4.0, 0.25 * 2 ** attempt))
            continue
        if status in (301, 302, 307, 308) and status not in stop_at and location:
            nxt = urllib.parse.urljoin(current, location)
            if mirrors.origin(nxt) is None:
                raise errors.NetworkError(f"{url}: refusing redirect to a non-HTTP URL {nxt}")
            if current.lower().startswith("https:") and not nxt.lower().startswith("https:"):
                raise errors.NetworkError(f"{url}: refusing redirect from https to http ({nxt})")
            hops += 1
            if hops > 10:
                raise errors.NetworkError(f"{url}: too many redirects")
            current = nxt
            continue
        return status, body, current
