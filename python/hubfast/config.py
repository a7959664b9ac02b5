"""Every environment variable hubfast reads, and its default, in one place.

Values are read when a call needs them (so a test or a long-lived process can
change them), except where tensorflow_hub fixes the semantics. Nothing else in
the package reads the environment for a setting: the native core gets each
value through the options it is given (http.fetch_options, cache.fetch_entry).

Settings are public (docs/settings.md: documented and supported) or tuning
(docs/settings-tuning.md: for measuring and debugging, unsupported, may change).
To add one:
  1. a ``*_ENV`` name below, listed in PUBLIC or TUNING;
  2. a field of Settings, parsed in settings() with its default (the only place
     the default is written; a native option it feeds must agree, see
     _core.native_defaults());
  3. a row in docs/settings.md or docs/settings-tuning.md.
tests/test_settings.py checks 1 and 3 against each other and against the code.
"""
from __future__ import annotations

import dataclasses
import os
import sys
import tempfile
from typing import Optional

from . import paths

# tensorflow_hub's variables (same meaning).
CACHE_DIR_ENV = "TFHUB_CACHE_DIR"
LOAD_FORMAT_ENV = "TFHUB_MODEL_LOAD_FORMAT"  # COMPRESSED | UNCOMPRESSED | AUTO
DOWNLOAD_PROGRESS_ENV = "TFHUB_DOWNLOAD_PROGRESS"
DISABLE_CERT_VALIDATION_ENV = "TFHUB_DISABLE_CERT_VALIDATION"  # only "true" counts

# hubfast's own.
OFFLINE_ENV = "HUBFAST_OFFLINE"
CACHE_LAYERS_ENV = "HUBFAST_CACHE_LAYERS"  # read-only cache roots, os.pathsep-separated
LOCK_TIMEOUT_ENV = "HUBFAST_LOCK_TIMEOUT"  # seconds; unset: wait as long as the writer lives
FSYNC_ENV = "HUBFAST_FSYNC"
LOCK_MODE_ENV = "HUBFAST_LOCK_MODE"  # auto | flock | heartbeat
CONNECTIONS_ENV = "HUBFAST_CONNECTIONS"  # most parallel connections per download
# 1: the first response streams alone, more connections only while the decoder waits
# for bytes (growth.h); 0: all at once
ADAPTIVE_CONNECTIONS_ENV = "HUBFAST_ADAPTIVE_CONNECTIONS"
DECODE_THREADS_ENV = "HUBFAST_DECODE_THREADS"  # gzip/zstd decoding threads; 0: every core
MIN_PARALLEL_BYTES_ENV = "HUBFAST_MIN_PARALLEL_BYTES"  # smaller archives: one connection
CONNECT_TIMEOUT_ENV = "HUBFAST_CONNECT_TIMEOUT"
STALL_TIMEOUT_ENV = "HUBFAST_STALL_TIMEOUT"
MAX_RETRIES_ENV = "HUBFAST_MAX_RETRIES"
MAX_EXTRACT_BYTES_ENV = "HUBFAST_MAX_EXTRACT_BYTES"
MAX_MEMBERS_ENV = "HUBFAST_MAX_MEMBERS"
PINS_ENV = "HUBFAST_PINS"  # file of "<handle> <sha256>" lines
# A team cache: a group whose members may own and write cache dirs, or "any" (trust.py)
TRUSTED_GROUP_ENV = "HUBFAST_TRUSTED_GROUP"
MIRRORS_ENV = "HUBFAST_MIRRORS"  # "prefix=replacement" pairs, comma-separated
SWARM_ENV = "HUBFAST_SWARM"  # a BitTorrent tracker's announce URL: swarm mode on
SWARM_INTERFACE_ENV = "HUBFAST_SWARM_INTERFACE"  # address swarm traffic uses; default any
SWARM_DISCOVERY_ENV = "HUBFAST_SWARM_DISCOVERY"  # extra discovery: any of dht,lsd,upnp,natpmp
SWARM_ENCRYPTION_ENV = "HUBFAST_SWARM_ENCRYPTION"  # 1: refuse unencrypted peer connections
PREFETCH_NICE_ENV = "HUBFAST_PREFETCH_NICE"  # nice increment of background fetches (0: none)
# Endpoint overrides for the public hosts (scheme://host[:port][/prefix]): a fleet's cache,
# or the loopback test server. Each names the hosts it stands in for.
ENDPOINT_ENVS = {
    "tfhub": "HUBFAST_ENDPOINT_TFHUB",  # tfhub.dev
    "kaggle": "HUBFAST_ENDPOINT_KAGGLE",  # www.kaggle.com, kaggle.com
    "gcs": "HUBFAST_ENDPOINT_GCS",  # storage.googleapis.com (gs:// objects)
    "cn": "HUBFAST_ENDPOINT_CN",  # hub.tensorflow.google.cn, gcs.tensorflow.google.cn
}
GCS_AUTH_ENV = "HUBFAST_GCS_AUTH"  # auto | on | off: google-auth credentials for gs://
GROWTH_TRACE_ENV = "HUBFAST_GROWTH_TRACE"  # 1: each growth window's readings on stderr


# Documented and supported (docs/settings.md).
PUBLIC = (OFFLINE_ENV, CACHE_LAYERS_ENV, LOCK_TIMEOUT_ENV, LOCK_MODE_ENV, FSYNC_ENV,
          CONNECTIONS_ENV, CONNECT_TIMEOUT_ENV, STALL_TIMEOUT_ENV, MAX_RETRIES_ENV,
          MAX_EXTRACT_BYTES_ENV, MAX_MEMBERS_ENV, PINS_ENV, MIRRORS_ENV,
          *ENDPOINT_ENVS.values(), GCS_AUTH_ENV,
          SWARM_ENV, SWARM_INTERFACE_ENV, SWARM_DISCOVERY_ENV, SWARM_ENCRYPTION_ENV,
          TRUSTED_GROUP_ENV)
# For measuring and debugging; documented as unsupported (docs/settings-tuning.md).
TUNING = (ADAPTIVE_CONNECTIONS_ENV, DECODE_THREADS_ENV, MIN_PARALLEL_BYTES_ENV,
          PREFETCH_NICE_ENV, GROWTH_TRACE_ENV)
# Kaggle's own variables (as the kaggle CLI and kagglehub read them).
KAGGLE_USERNAME_ENV = "KAGGLE_USERNAME"
KAGGLE_KEY_ENV = "KAGGLE_KEY"
KAGGLE_CONFIG_DIR_ENV = "KAGGLE_CONFIG_DIR"  # holds kaggle.json; default ~/.kaggle
XDG_CONFIG_HOME_ENV = "XDG_CONFIG_HOME"  # ~/.config/kaggle/kaggle.json as a fallback
# Google's variables, read only to decide whether asking google-auth is worth it
# (google-auth itself reads them again).
GOOGLE_CREDENTIALS_ENV = "GOOGLE_APPLICATION_CREDENTIALS"
CLOUDSDK_CONFIG_ENV = "CLOUDSDK_CONFIG"  # gcloud's config dir (application default creds)
GOOGLE_CLOUD_ENVS = ("GCE_METADATA_HOST", "GCE_METADATA_IP", "K_SERVICE", "GAE_ENV",
                     "CLOUD_RUN_JOB", "FUNCTION_TARGET")  # any set: running on Google Cloud


def _flag(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() in ("1", "true", "yes", "on")


def _float(name: str, default: Optional[float]) -> Optional[float]:
    raw = os.environ.get(name, "").strip()
    if not raw:
        return default
    try:
        return float(raw)
    except ValueError:
        raise ValueError(f"{name}={raw!r} is not a number") from None


def _int(name: str, default: int) -> int:
    value = _float(name, float(default))
    return int(value) if value is not None else default


def _absl_cache_dir() -> Optional[str]:
    """tensorflow_hub's --tfhub_cache_dir flag, when absl parsed it."""
    flags_mod = sys.modules.get("absl.flags")
    if flags_mod is None:
        return None
    flags = flags_mod.FLAGS
    try:
        if flags.is_parsed() and "tfhub_cache_dir" in flags:
            return flags["tfhub_cache_dir"].value or None
    except Exception:  # absl raises on unparsed access in some versions
        return None
    return None


def _absl_load_format() -> Optional[str]:
    """tensorflow_hub's --tfhub_model_load_format flag, when absl parsed it."""
    flags_mod = sys.modules.get("absl.flags")
    if flags_mod is None:
        return None
    flags = flags_mod.FLAGS
    try:
        if flags.is_parsed() and "tfhub_model_load_format" in flags:
            return flags["tfhub_model_load_format"].value or None
    except Exception:  # absl raises on unparsed access in some versions
        return None
    return None


@dataclasses.dataclass(frozen=True)
class Settings:
    cache_dir: str
    cache_layers: tuple
    offline: bool
    load_format: str
    show_progress: bool
    verify_tls: bool
    lock_timeout: float
    lock_mode: str
    fsync: bool
    connections: int
    connect_timeout: float
    stall_timeout: float
    max_retries: int
    max_extract_bytes: int
    max_members: int
    pins_file: Optional[str]
    mirrors: tuple
    endpoints: tuple  # (service, base URL) pairs, see ENDPOINT_ENVS
    gcs_auth: str
    prefetch_nice: int
    adaptive_connections: bool
    min_parallel_bytes: int
    decode_threads: int
    growth_trace: bool
    swarm: str  # tracker announce URL; "": swarm mode off
    swarm_interface: str
    swarm_discovery: tuple
    swarm_encryption: bool
    trusted_group: str  # "", a group name or gid, or "any"
    cache_dir_is_default: bool  # $TMPDIR/tfhub_modules: created 0700


def _cache_dir_named() -> Optional[str]:
    return os.environ.get(CACHE_DIR_ENV) or _absl_cache_dir()


def cache_dir() -> str:
    """The writable cache root: TFHUB_CACHE_DIR, --tfhub_cache_dir, else $TMPDIR/tfhub_modules.

    A ``file:///abs/path`` URL means ``/abs/path`` (tensorflow_hub passes it to tf.io.gfile).
    """
    return paths.local_path(_cache_dir_named() or os.path.join(tempfile.gettempdir(), "tfhub_modules"))


def _mirrors() -> tuple:
    pairs = []
    for item in os.environ.get(MIRRORS_ENV, "").split(","):
        if "=" in item:
            src, dst = item.split("=", 1)
            pairs.append((src.strip(), dst.strip()))
    return tuple(pairs)


def _endpoints() -> tuple:
    pairs = []
    for service, env in ENDPOINT_ENVS.items():
        value = os.environ.get(env, "").strip()
        if value:
            pairs.append((service, value))
    return tuple(pairs)


def settings() -> Settings:
    layers = tuple(p for p in os.environ.get(CACHE_LAYERS_ENV, "").split(os.pathsep) if p)
    return Settings(
        cache_dir=cache_dir(),
        cache_layers=layers,
        offline=_flag(OFFLINE_ENV),
        load_format=load_format(),
        show_progress=bool(os.environ.get(DOWNLOAD_PROGRESS_ENV)),
        verify_tls=os.environ.get(DISABLE_CERT_VALIDATION_ENV) != "true",
        lock_timeout=_float(LOCK_TIMEOUT_ENV, -1.0),
        lock_mode=os.environ.get(LOCK_MODE_ENV, "auto").strip().lower() or "auto",
        fsync=_flag(FSYNC_ENV),
        connections=_int(CONNECTIONS_ENV, 8),
        connect_timeout=_float(CONNECT_TIMEOUT_ENV, 30.0),
        stall_timeout=_float(STALL_TIMEOUT_ENV, 30.0),
        max_retries=_int(MAX_RETRIES_ENV, 5),
        max_extract_bytes=_int(MAX_EXTRACT_BYTES_ENV, 64 << 30),
        max_members=_int(MAX_MEMBERS_ENV, 1_000_000),
        pins_file=os.environ.get(PINS_ENV) or None,
        mirrors=_mirrors(),
        endpoints=_endpoints(),
        gcs_auth=os.environ.get(GCS_AUTH_ENV, "auto").strip().lower() or "auto",
        prefetch_nice=_int(PREFETCH_NICE_ENV, 10),
        adaptive_connections=os.environ.get(ADAPTIVE_CONNECTIONS_ENV, "1").strip() != "0",
        min_parallel_bytes=_int(MIN_PARALLEL_BYTES_ENV, 64 << 20),
        decode_threads=_int(DECODE_THREADS_ENV, 0),
        swarm=os.environ.get(SWARM_ENV, "").strip(),
        swarm_interface=os.environ.get(SWARM_INTERFACE_ENV, "").strip(),
        swarm_discovery=tuple(d.strip().lower() for d in
                              os.environ.get(SWARM_DISCOVERY_ENV, "").split(",") if d.strip()),
        swarm_encryption=_flag(SWARM_ENCRYPTION_ENV),
        trusted_group=os.environ.get(TRUSTED_GROUP_ENV, "").strip(),
        cache_dir_is_default=not _cache_dir_named(),
        growth_trace=_flag(GROWTH_TRACE_ENV),
    )


def load_format() -> str:
    """TFHUB_MODEL_LOAD_FORMAT, else --tfhub_model_load_format, upper-cased (cheap: one read)."""
    return (os.environ.get(LOAD_FORMAT_ENV) or _absl_load_format() or "COMPRESSED").upper()


@dataclasses.dataclass(frozen=True)
class KaggleEnv:
    """Kaggle's variables, read when a Kaggle handle is fetched."""

    username: Optional[str]
    key: Optional[str]
    config_dir: Optional[str]
    xdg_config_home: Optional[str]


def kaggle_env() -> KaggleEnv:
    return KaggleEnv(os.environ.get(KAGGLE_USERNAME_ENV) or None,
                     os.environ.get(KAGGLE_KEY_ENV) or None,
                     os.environ.get(KAGGLE_CONFIG_DIR_ENV) or None,
                     os.environ.get(XDG_CONFIG_HOME_ENV) or None)


@dataclasses.dataclass(frozen=True)
class GoogleEnv:
    """Google's variables, read when a gs:// archive is fetched."""

    credentials: Optional[str]  # GOOGLE_APPLICATION_CREDENTIALS
    cloudsdk_config: Optional[str]
    on_google_cloud: bool  # one of GOOGLE_CLOUD_ENVS is set


def google_env() -> GoogleEnv:
    return GoogleEnv(os.environ.get(GOOGLE_CREDENTIALS_ENV) or None,
                     os.environ.get(CLOUDSDK_CONFIG_ENV) or None,
                     any(os.environ.get(v) for v in GOOGLE_CLOUD_ENVS))
