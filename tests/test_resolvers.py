"""Every handle kind, fetched end to end from real loopback servers through the
endpoint overrides: tfhub.dev (and its redirect to Kaggle), Kaggle with
credentials, gs:// archives, the China mirror, direct and presigned archive
URLs, UNCOMPRESSED, mirrors, pins, local paths and user resolvers.

Parity with tensorflow_hub itself (its entry names, URLs and caches) is in
test_tfhub_parity.py."""
from __future__ import annotations

import base64
import hashlib
import json
import os
import pathlib
from pathlib import Path

import pytest

import hubfast
from hubfast import errors, resolvers
from hubfast.server import TFHubServer
from hubfast.testing.certs import make_self_signed_cert
from hubfast.testing.faults import Fault
from hubfast.testing.models import pack_tar, tree_digest

CLEARED_ENV = (
    "TFHUB_MODEL_LOAD_FORMAT", "TFHUB_DISABLE_CERT_VALIDATION", "TFHUB_DOWNLOAD_PROGRESS",
    "HUBFAST_MIRRORS", "HUBFAST_PINS", "HUBFAST_OFFLINE", "HUBFAST_CACHE_LAYERS",
    "HUBFAST_ENDPOINT_TFHUB", "HUBFAST_ENDPOINT_KAGGLE", "HUBFAST_ENDPOINT_GCS",
    "HUBFAST_ENDPOINT_CN", "HUBFAST_GCS_AUTH", "KAGGLE_USERNAME", "KAGGLE_KEY",
    "KAGGLE_CONFIG_DIR", "XDG_CONFIG_HOME", "GOOGLE_APPLICATION_CREDENTIALS", "CLOUDSDK_CONFIG",
    "REQUESTS_CA_BUNDLE", "CURL_CA_BUNDLE", "SSL_CERT_FILE", "http_proxy", "https_proxy",
    "all_proxy", "HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY",
)

KAGGLE_PATH = "/models/acme/mul/tensorFlow2/default/1"
KAGGLE_HANDLE = "https://www.kaggle.com" + KAGGLE_PATH


def sha1(s: str) -> str:
    return hashlib.sha1(s.encode("utf8")).hexdigest()


def basic(user: str, key: str) -> str:
    return "Basic " + base64.b64encode(f"{user}:{key}".encode()).decode()


@pytest.fixture(autouse=True)
def clean_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """No setting from the outside leaks in; HOME is empty (no ~/.kaggle); a fresh cache."""
    for name in CLEARED_ENV:
        monkeypatch.delenv(name, raising=False)
    home = tmp_path / "home"
    home.mkdir()
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.setenv("HUBFAST_MAX_RETRIES", "1")
    # Not the machine's own Google credentials (a CI runner on GCE has some).
    monkeypatch.setenv("HUBFAST_GCS_AUTH", "off")
    cache = tmp_path / "cache"
    cache.mkdir()
    monkeypatch.setenv("TFHUB_CACHE_DIR", str(cache))
    return cache


@pytest.fixture
def cache(clean_env: Path) -> Path:
    return clean_env


@pytest.fixture(scope="module")
def model_src(tmp_path_factory) -> Path:
    """A model-shaped tree (the resolvers do not care whether it is a real SavedModel)."""
    src = tmp_path_factory.mktemp("model") / "src"
    (src / "variables").mkdir(parents=True)
    (src / "assets").mkdir()
    (src / "saved_model.pb").write_bytes(b"saved model " * 50)
    (src / "variables" / "variables.index").write_bytes(b"index" * 20)
    (src / "variables" / "variables.data-00000-of-00001").write_bytes(os.urandom(200_000))
    (src / "assets" / "vocab.txt").write_text("a\nb\n")
    return src


@pytest.fixture(scope="module")
def archives(model_src: Path) -> dict:
    out = model_src.parent
    return {
        "gz": Path(pack_tar(model_src, out / "m.tar.gz", "gz")),
        "zst": Path(pack_tar(model_src, out / "m.tar.zst", "zst")),
        "tar": Path(pack_tar(model_src, out / "m.tar", "none")),
    }


@pytest.fixture
def server():
    with TFHubServer() as srv:
        yield srv
    assert not srv.errors


@pytest.fixture
def server2():
    """A second host (another port: another origin) for redirects and mirrors."""
    with TFHubServer() as srv:
        yield srv
    assert not srv.errors


def requests_of(srv: TFHubServer) -> list:
    return [(r.method, r.path, r.query) for r in srv.stats.log]


def assert_entry(path: str, cache: Path, handle: str, model_src: Path) -> None:
    assert path == str(cache / sha1(handle))
    assert tree_digest(path) == tree_digest(model_src)


def assert_nothing_cached(cache: Path, handle: str) -> None:
    name = sha1(handle)
    left = [p.name for p in cache.iterdir() if p.name.startswith(name)]
    assert left in ([], [name + ".hubfast.lock"]), left


# The chain ---------------------------------------------------------------------------------


def test_chain_is_tensorflow_hubs_order():
    kinds = [type(r).__name__ for r in resolvers.chain()]
    assert kinds == ["HttpCompressedResolver", "GcsCompressedResolver",
                     "HttpUncompressedResolver", "LocalArchiveResolver", "PathResolver"]


# tfhub.dev, Kaggle, the China mirror ------------------------------------------------------


def test_tfhub_dev_handle_through_endpoint_override(server, cache, archives, model_src, monkeypatch):
    server.add_archive("/google/mul/1", archives["gz"])
    monkeypatch.setenv("HUBFAST_ENDPOINT_TFHUB", server.url)
    handle = "https://tfhub.dev/google/mul/1"
    assert_entry(hubfast.resolve(handle), cache, handle, model_src)
    assert requests_of(server) == [("GET", "/google/mul/1", "tf-hub-format=compressed")]
    assert server.stats.log[0].authorization is None
    # Warm: no request at all.
    assert hubfast.resolve(handle) == str(cache / sha1(handle))
    assert len(server.stats.log) == 1


def test_existing_query_is_kept_and_auto_means_compressed(server, cache, archives, model_src,
                                                          monkeypatch):
    server.add_archive("/google/mul/1", archives["gz"])
    monkeypatch.setenv("TFHUB_MODEL_LOAD_FORMAT", "AUTO")
    handle = server.url_for("/google/mul/1", "b=2&a=1")
    assert_entry(hubfast.resolve(handle), cache, handle, model_src)
    assert requests_of(server) == [("GET", "/google/mul/1", "b=2&a=1&tf-hub-format=compressed")]


def test_tfhub_dev_redirect_to_kaggle_is_followed(server, server2, cache, archives, model_src,
                                                  monkeypatch):
    """tfhub.dev answers with a redirect to Kaggle; the query goes along."""
    server2.add_archive(KAGGLE_PATH, archives["gz"])
    server.add_redirect("/google/mul/1", server2.url_for(KAGGLE_PATH), keep_query=True)
    monkeypatch.setenv("HUBFAST_ENDPOINT_TFHUB", server.url)
    monkeypatch.setenv("KAGGLE_USERNAME", "alice")
    monkeypatch.setenv("KAGGLE_KEY", "s3cret")
    handle = "https://tfhub.dev/google/mul/1"
    assert_entry(hubfast.resolve(handle), cache, handle, model_src)
    assert requests_of(server) == [("GET", "/google/mul/1", "tf-hub-format=compressed")]
    assert requests_of(server2) == [("GET", KAGGLE_PATH, "tf-hub-format=compressed")]
    # A tfhub.dev handle carries no Kaggle credentials, not even to the Kaggle host.
    assert all(r.authorization is None for r in server.stats.log + server2.stats.log)


def test_china_mirror_rewrite(server, cache, archives, model_src, monkeypatch):
    server.add_archive("/tfhub-modules/google/mul/1.tar.gz", archives["gz"])
    server.add_archive("/google/mul/1", archives["gz"])
    monkeypatch.setenv("HUBFAST_ENDPOINT_CN", server.url)
    handle = "https://hub.tensorflow.google.cn/google/mul/1"
    assert_entry(hubfast.resolve(handle), cache, handle, model_src)
    assert requests_of(server) == [("GET", "/tfhub-modules/google/mul/1.tar.gz", "")]
    # tensorflow_hub's rule is for the https:// prefix only: http:// is a plain handle.
    server.reset_stats()
    plain = "http://hub.tensorflow.google.cn/google/mul/1"
    assert_entry(hubfast.resolve(plain), cache, plain, model_src)
    assert requests_of(server) == [("GET", "/google/mul/1", "tf-hub-format=compressed")]


# Kaggle credentials ------------------------------------------------------------------------


def test_kaggle_credentials_from_env_go_to_kaggle_only(server, server2, cache, archives,
                                                       model_src, monkeypatch):
    server.add_archive(KAGGLE_PATH, archives["gz"])
    server2.add_archive("/google/mul/1", archives["gz"])
    monkeypatch.setenv("HUBFAST_ENDPOINT_KAGGLE", server.url)
    monkeypatch.setenv("HUBFAST_ENDPOINT_TFHUB", server2.url)
    monkeypatch.setenv("KAGGLE_USERNAME", "alice")
    monkeypatch.setenv("KAGGLE_KEY", "s3cret")
    assert_entry(hubfast.resolve(KAGGLE_HANDLE), cache, KAGGLE_HANDLE, model_src)
    (rec,) = server.stats.log
    assert (rec.path, rec.query) == (KAGGLE_PATH, "tf-hub-format=compressed")
    assert rec.authorization == basic("alice", "s3cret")
    # Another public host never sees them.
    hubfast.resolve("https://tfhub.dev/google/mul/1")
    assert [r.authorization for r in server2.stats.log] == [None]


def test_kaggle_credentials_from_kaggle_json(server, cache, archives, model_src, monkeypatch,
                                             clean_env):
    home = Path(os.environ["HOME"])
    (home / ".kaggle").mkdir()
    (home / ".kaggle" / "kaggle.json").write_text(json.dumps({"username": "bob", "key": "k3y"}))
    server.add_archive(KAGGLE_PATH, archives["gz"])
    monkeypatch.setenv("HUBFAST_ENDPOINT_KAGGLE", server.url)
    assert_entry(hubfast.resolve(KAGGLE_HANDLE), cache, KAGGLE_HANDLE, model_src)
    assert [r.authorization for r in server.stats.log] == [basic("bob", "k3y")]


def test_kaggle_credentials_dropped_on_cross_origin_redirect(server, server2, cache, archives,
                                                            model_src, monkeypatch):
    """Kaggle redirects downloads to presigned storage URLs: the credentials stay behind,
    and the presigned query arrives intact."""
    signed = "X-Goog-Signature=abc&X-Goog-Expires=60"
    server2.add_archive("/bucket/blob.tar.gz", archives["gz"])
    server.add_redirect(KAGGLE_PATH, server2.url_for("/bucket/blob.tar.gz", signed))
    monkeypatch.setenv("HUBFAST_ENDPOINT_KAGGLE", server.url)
    monkeypatch.setenv("KAGGLE_USERNAME", "alice")
    monkeypatch.setenv("KAGGLE_KEY", "s3cret")
    assert_entry(hubfast.resolve(KAGGLE_HANDLE), cache, KAGGLE_HANDLE, model_src)
    assert [r.authorization for r in server.stats.log] == [basic("alice", "s3cret")]
    assert [(r.path, r.query) for r in server2.stats.log if r.method == "GET"][0] == (
        "/bucket/blob.tar.gz", signed)
    assert all(r.authorization is None for r in server2.stats.log)


def test_kaggle_mirrored_elsewhere_gets_no_credentials(server, cache, archives, monkeypatch):
    server.add_archive("/kaggle-cache" + KAGGLE_PATH, archives["gz"])
    monkeypatch.setenv("HUBFAST_MIRRORS", f"https://www.kaggle.com/={server.url}/kaggle-cache/")
    monkeypatch.setenv("KAGGLE_USERNAME", "alice")
    monkeypatch.setenv("KAGGLE_KEY", "s3cret")
    hubfast.resolve(KAGGLE_HANDLE)
    assert [(r.path, r.authorization) for r in server.stats.log] == [
        ("/kaggle-cache" + KAGGLE_PATH, None)]


def test_kaggle_403_says_what_to_do(server, cache, archives, monkeypatch):
    server.add_archive(KAGGLE_PATH, archives["gz"])
    server.inject(KAGGLE_PATH, Fault.status(403))
    monkeypatch.setenv("HUBFAST_ENDPOINT_KAGGLE", server.url)
    with pytest.raises(PermissionError) as info:
        hubfast.resolve(KAGGLE_HANDLE)
    assert isinstance(info.value, errors.AccessDeniedError)
    assert "KAGGLE_USERNAME" in str(info.value)
    assert_nothing_cached(cache, KAGGLE_HANDLE)


# gs:// -------------------------------------------------------------------------------------


def test_gcs_archives(server, cache, archives, model_src, monkeypatch):
    server.add_archive("/bucket/dir/m.tar.gz", archives["gz"])
    server.add_archive("/bucket/dir/m.tgz", archives["gz"])
    server.add_archive("/bucket/dir/m.tar", archives["tar"])
    server.add_archive("/bucket/my models/m.tar.zst", archives["zst"])
    monkeypatch.setenv("HUBFAST_ENDPOINT_GCS", server.url)
    handles = ["gs://bucket/dir/m.tar.gz", "gs://bucket/dir/m.tgz", "gs://bucket/dir/m.tar",
               "gs://bucket/my models/m.tar.zst"]
    for h in handles:
        assert type(resolvers.resolver_for(h)).__name__ == "GcsCompressedResolver"
        assert_entry(hubfast.resolve(h), cache, h, model_src)
    assert requests_of(server) == [
        ("GET", "/bucket/dir/m.tar.gz", ""), ("GET", "/bucket/dir/m.tgz", ""),
        ("GET", "/bucket/dir/m.tar", ""), ("GET", "/bucket/my models/m.tar.zst", "")]
    assert all(r.authorization is None for r in server.stats.log)  # HUBFAST_GCS_AUTH=off


def test_gcs_https_url_form():
    from hubfast import mirrors

    assert mirrors.gs_to_https("gs://b/a b/m.tar.gz") == \
        "https://storage.googleapis.com/b/a%20b/m.tar.gz"
    with pytest.raises(ValueError):
        mirrors.gs_to_https("gs://bucket-only")


def test_gcs_directory_is_returned_in_place(server, monkeypatch):
    monkeypatch.setenv("HUBFAST_ENDPOINT_GCS", server.url)
    assert hubfast.resolve("gs://bucket/saved_model_dir") == "gs://bucket/saved_model_dir"
    assert server.stats.log == []


def test_gcs_unusable_credentials_fall_back_to_anonymous(server, cache, archives, model_src,
                                                         monkeypatch, tmp_path):
    """With or without google-auth installed: a broken credentials setting is logged and
    public objects still come (anonymously); a bad HUBFAST_GCS_AUTH value is named."""
    server.add_archive("/bucket/m.tar.gz", archives["gz"])
    monkeypatch.setenv("HUBFAST_ENDPOINT_GCS", server.url)
    monkeypatch.setenv("HUBFAST_GCS_AUTH", "on")
    monkeypatch.setenv("GOOGLE_APPLICATION_CREDENTIALS", str(tmp_path / "missing.json"))
    assert_entry(hubfast.resolve("gs://bucket/m.tar.gz"), cache, "gs://bucket/m.tar.gz",
                 model_src)
    assert [r.authorization for r in server.stats.log] == [None]
    monkeypatch.setenv("HUBFAST_GCS_AUTH", "maybe")
    with pytest.raises(ValueError, match="HUBFAST_GCS_AUTH"):
        hubfast.resolve("gs://bucket/other.tar.gz")


def _google_auth_available() -> bool:
    try:
        import google.auth  # noqa: F401
    except ImportError:
        return False
    return True


# dev/setup installs google-auth: under CI (CI set) a missing one fails instead of skipping.
@pytest.mark.skipif(not _google_auth_available() and not os.environ.get("CI"),
                    reason="google-auth is not installed (pip install 'hubfast[gcs]')")
def test_gcs_bearer_token_goes_to_gcs_only(server, server2, cache, archives, model_src,
                                          monkeypatch, tmp_path):
    """Application Default Credentials (an authorized_user file holding a valid token)."""
    adc = tmp_path / "adc.json"
    adc.write_text(json.dumps({
        "type": "authorized_user", "client_id": "id", "client_secret": "secret",
        "refresh_token": "refresh", "token": "ya29.test-token",
        "expiry": "2099-01-01T00:00:00Z"}))
    monkeypatch.setenv("GOOGLE_APPLICATION_CREDENTIALS", str(adc))
    monkeypatch.setenv("HUBFAST_GCS_AUTH", "auto")
    monkeypatch.setenv("HUBFAST_ENDPOINT_GCS", server.url)
    server.add_archive("/bucket/m.tar.gz", archives["gz"])
    server2.add_archive("/elsewhere/m.tar.gz", archives["gz"])
    server.add_redirect("/bucket/moved.tar.gz", server2.url_for("/elsewhere/m.tar.gz"))
    assert_entry(hubfast.resolve("gs://bucket/m.tar.gz"), cache, "gs://bucket/m.tar.gz", model_src)
    hubfast.resolve("gs://bucket/moved.tar.gz")
    assert [(r.path, r.authorization) for r in server.stats.log] == [
        ("/bucket/m.tar.gz", "Bearer ya29.test-token"),
        ("/bucket/moved.tar.gz", "Bearer ya29.test-token")]
    assert [r.authorization for r in server2.stats.log if r.method == "GET"] == [None]
    # Not for http(s) handles on that host, and not when switched off.
    server.reset_stats()
    hubfast.resolve(server.url_for("/bucket/m.tar.gz"))
    monkeypatch.setenv("HUBFAST_GCS_AUTH", "off")
    server.add_archive("/bucket/m2.tar.gz", archives["gz"])
    hubfast.resolve("gs://bucket/m2.tar.gz")
    assert [r.authorization for r in server.stats.log] == [None, None]


# Direct archive URLs -----------------------------------------------------------------------


def test_direct_archive_urls_are_fetched_as_given(server, cache, archives, model_src,
                                                  monkeypatch):
    server.add_archive("/files/m.tar.gz", archives["gz"])
    server.add_archive("/files/m.tar.zst", archives["zst"])
    server.add_archive("/files/m.tar", archives["tar"])
    presigned = server.url_for("/files/m.tar.gz", "X-Goog-Signature=abc&X-Goog-Expires=60")
    for h in [server.url_for("/files/m.tar.gz"), server.url_for("/files/m.tar.zst"),
              server.url_for("/files/m.tar"), presigned]:
        assert_entry(hubfast.resolve(h), cache, h, model_src)
    assert requests_of(server) == [
        ("GET", "/files/m.tar.gz", ""), ("GET", "/files/m.tar.zst", ""), ("GET", "/files/m.tar", ""),
        ("GET", "/files/m.tar.gz", "X-Goog-Signature=abc&X-Goog-Expires=60")]
    # In UNCOMPRESSED mode too: an archive has no uncompressed form.
    monkeypatch.setenv("TFHUB_MODEL_LOAD_FORMAT", "UNCOMPRESSED")
    server.reset_stats()
    h = server.url_for("/files/m.tar.gz", "v=2")
    assert_entry(hubfast.resolve(h), cache, h, model_src)
    assert requests_of(server) == [("GET", "/files/m.tar.gz", "v=2")]


# UNCOMPRESSED ------------------------------------------------------------------------------


def test_uncompressed_returns_gcs_location_without_caching(server, cache, archives, monkeypatch):
    server.add_archive("/google/mul/1", archives["gz"],
                       uncompressed_location="gs://tfhub-modules/google/mul/1/uncompressed")
    monkeypatch.setenv("HUBFAST_ENDPOINT_TFHUB", server.url)
    monkeypatch.setenv("TFHUB_MODEL_LOAD_FORMAT", "UNCOMPRESSED")
    handle = "https://tfhub.dev/google/mul/1"
    assert type(resolvers.resolver_for(handle)).__name__ == "HttpUncompressedResolver"
    assert hubfast.resolve(handle) == "gs://tfhub-modules/google/mul/1/uncompressed"
    assert requests_of(server) == [("GET", "/google/mul/1", "tf-hub-format=uncompressed")]
    assert server.stats.archive_gets == 0
    assert list(cache.iterdir()) == []


def test_uncompressed_unexpected_answers(server, archives, monkeypatch):
    server.add_archive("/google/mul/1", archives["gz"])
    monkeypatch.setenv("TFHUB_MODEL_LOAD_FORMAT", "UNCOMPRESSED")
    handle = server.url_for("/google/mul/1")
    # tensorflow_hub raises ValueError for anything but a 303 with a gs:// body.
    server.inject("/google/mul/1", Fault.status(200, body=b"<html>a model page</html>"))
    with pytest.raises(ValueError, match="HTTP 200"):
        hubfast.resolve(handle)
    server.inject("/google/mul/1", Fault.status(303, body=b"https://example.com/x"))
    with pytest.raises(ValueError, match="gs:// location"):
        hubfast.resolve(handle)
    with pytest.raises(ValueError) as info:
        hubfast.resolve(server.url_for("/google/missing/1"))
    assert isinstance(info.value, errors.NotFoundError) and info.value.code == 404
    # A transient 503 is retried.
    server.inject("/google/mul/1", Fault.status(503))
    assert hubfast.resolve(handle).startswith("gs://")


def test_uncompressed_request_times_out(server, archives, monkeypatch):
    import time

    server.add_archive("/google/mul/1", archives["gz"])
    server.inject("/google/mul/1", Fault.delay(20))
    monkeypatch.setenv("TFHUB_MODEL_LOAD_FORMAT", "UNCOMPRESSED")
    monkeypatch.setenv("HUBFAST_CONNECT_TIMEOUT", "0.5")
    monkeypatch.setenv("HUBFAST_STALL_TIMEOUT", "0.5")
    monkeypatch.setenv("HUBFAST_MAX_RETRIES", "0")
    start = time.monotonic()
    with pytest.raises(errors.DownloadTimeoutError):
        hubfast.resolve(server.url_for("/google/mul/1"))
    assert time.monotonic() - start < 5


def test_uncompressed_kaggle_credentials_and_redirects(server, server2, archives, monkeypatch):
    """The Python-side request sends credentials to Kaggle only, and follows a 302
    without them."""
    server2.add_archive("/real" + KAGGLE_PATH, archives["gz"], uncompressed_location="gs://k/m")
    server.add_redirect(KAGGLE_PATH, server2.url_for("/real" + KAGGLE_PATH), keep_query=True)
    monkeypatch.setenv("HUBFAST_ENDPOINT_KAGGLE", server.url)
    monkeypatch.setenv("TFHUB_MODEL_LOAD_FORMAT", "UNCOMPRESSED")
    monkeypatch.setenv("KAGGLE_USERNAME", "alice")
    monkeypatch.setenv("KAGGLE_KEY", "s3cret")
    assert hubfast.resolve(KAGGLE_HANDLE) == "gs://k/m"
    assert [(r.query, r.authorization) for r in server.stats.log] == [
        ("tf-hub-format=uncompressed", basic("alice", "s3cret"))]
    assert [(r.query, r.authorization) for r in server2.stats.log] == [
        ("tf-hub-format=uncompressed", None)]


def test_uncompressed_over_tls(tmp_path, archives, monkeypatch):
    ca, cert, key = make_self_signed_cert(tmp_path / "tls")
    with TFHubServer(tls=(cert, key)) as srv:
        srv.add_archive("/google/mul/1", archives["gz"], uncompressed_location="gs://b/m")
        monkeypatch.setenv("TFHUB_MODEL_LOAD_FORMAT", "UNCOMPRESSED")
        handle = srv.url_for("/google/mul/1")
        with pytest.raises(errors.NetworkError):  # unknown CA
            hubfast.resolve(handle)
        monkeypatch.setenv("REQUESTS_CA_BUNDLE", ca)
        assert hubfast.resolve(handle) == "gs://b/m"
        monkeypatch.delenv("REQUESTS_CA_BUNDLE")
        monkeypatch.setenv("TFHUB_DISABLE_CERT_VALIDATION", "true")
        assert hubfast.resolve(handle) == "gs://b/m"


def test_uncompressed_offline_fails_fast(monkeypatch):
    monkeypatch.setenv("TFHUB_MODEL_LOAD_FORMAT", "UNCOMPRESSED")
    monkeypatch.setenv("HUBFAST_OFFLINE", "1")
    with pytest.raises(errors.OfflineError):
        hubfast.resolve("http://127.0.0.1:9/google/mul/1")


def test_invalid_load_format_is_named(monkeypatch):
    monkeypatch.setenv("TFHUB_MODEL_LOAD_FORMAT", "FAST")
    with pytest.raises(ValueError, match="TFHUB_MODEL_LOAD_FORMAT"):
        hubfast.resolve("https://tfhub.dev/google/mul/1")


# Mirrors and endpoint overrides ------------------------------------------------------------


def test_mirrors_rewrite_prefixes_and_keep_entry_names(server, server2, cache, archives,
                                                       model_src, monkeypatch):
    server.add_archive("/tfhub/google/mul/1", archives["gz"])
    server.add_archive("/tfhub-google-special/mul/1", archives["gz"])
    server.add_archive("/gcs/bucket/m.tar.gz", archives["gz"])
    monkeypatch.setenv("HUBFAST_MIRRORS", ",".join([
        f"https://tfhub.dev/={server.url}/tfhub/",
        f"https://tfhub.dev/google/special/={server.url}/tfhub-google-special/",
        f"gs://bucket/={server.url}/gcs/bucket/"]))
    # The endpoint overrides point at a server without these paths: mirrors win.
    monkeypatch.setenv("HUBFAST_ENDPOINT_TFHUB", server2.url)
    monkeypatch.setenv("HUBFAST_ENDPOINT_GCS", server2.url)
    for h in ["https://tfhub.dev/google/mul/1", "https://tfhub.dev/google/special/mul/1",
              "gs://bucket/m.tar.gz"]:
        assert_entry(hubfast.resolve(h), cache, h, model_src)
    assert requests_of(server) == [
        ("GET", "/tfhub/google/mul/1", "tf-hub-format=compressed"),
        ("GET", "/tfhub-google-special/mul/1", "tf-hub-format=compressed"),
        ("GET", "/gcs/bucket/m.tar.gz", "")]
    assert server2.stats.log == []


def test_mirror_of_the_gcs_https_form(server, cache, archives, model_src, monkeypatch):
    server.add_archive("/cache/bucket/m.tar.gz", archives["gz"])
    monkeypatch.setenv("HUBFAST_MIRRORS", f"https://storage.googleapis.com/={server.url}/cache/")
    assert_entry(hubfast.resolve("gs://bucket/m.tar.gz"), cache, "gs://bucket/m.tar.gz", model_src)
    assert requests_of(server) == [("GET", "/cache/bucket/m.tar.gz", "")]


def test_bad_mirror_and_endpoint_settings_are_named(monkeypatch):
    monkeypatch.setenv("HUBFAST_MIRRORS", "https://tfhub.dev/=/srv/models/")
    with pytest.raises(ValueError, match="HUBFAST_MIRRORS"):
        hubfast.resolve("https://tfhub.dev/google/mul/1")
    monkeypatch.delenv("HUBFAST_MIRRORS")
    monkeypatch.setenv("HUBFAST_ENDPOINT_TFHUB", "localhost:8080")
    with pytest.raises(ValueError, match="HUBFAST_ENDPOINT_TFHUB"):
        hubfast.resolve("https://tfhub.dev/google/mul/1")


def test_describe_hides_secrets(monkeypatch):
    monkeypatch.setenv("KAGGLE_USERNAME", "alice")
    monkeypatch.setenv("KAGGLE_KEY", "s3cret")
    d = resolvers.describe(KAGGLE_HANDLE)
    assert d["resolver"] == "HttpCompressedResolver"
    assert d["entry_name"] == sha1(KAGGLE_HANDLE)
    assert d["url"] == KAGGLE_HANDLE + "?tf-hub-format=compressed"
    assert d["headers"] == ["Authorization"]
    assert "s3cret" not in repr(d)


# Pins --------------------------------------------------------------------------------------


def test_pins_file_mismatch_caches_nothing(server, cache, archives, model_src, monkeypatch,
                                          tmp_path):
    server.add_archive("/google/mul/1", archives["gz"])
    handle = server.url_for("/google/mul/1")
    good = hashlib.sha256(archives["gz"].read_bytes()).hexdigest()
    pins = tmp_path / "pins.txt"
    pins.write_text(f"# pinned models\n{handle} {'0' * 64}\n")
    monkeypatch.setenv("HUBFAST_PINS", str(pins))
    with pytest.raises(errors.IntegrityError):
        hubfast.resolve(handle)
    assert_nothing_cached(cache, handle)
    # An explicit pin wins over the file.
    with pytest.raises(errors.IntegrityError):
        resolvers.resolve_entry(handle, sha256="f" * 64)
    assert resolvers.resolve_entry(handle, sha256=good.upper()).path == str(cache / sha1(handle))
    # The right pin in the file.
    other = server.url_for("/google/mul/1", "v=2")
    pins.write_text(f"{other}   {good}\n")
    assert_entry(hubfast.resolve(other), cache, other, model_src)


def test_pins_apply_to_gcs_and_local_archives(server, cache, archives, monkeypatch, tmp_path):
    server.add_archive("/bucket/m.tar.gz", archives["gz"])
    monkeypatch.setenv("HUBFAST_ENDPOINT_GCS", server.url)
    pins = tmp_path / "pins.txt"
    local = str(archives["zst"])
    pins.write_text(f"gs://bucket/m.tar.gz {'1' * 64}\n{local} {'2' * 64}\n")
    monkeypatch.setenv("HUBFAST_PINS", str(pins))
    with pytest.raises(errors.IntegrityError):
        hubfast.resolve("gs://bucket/m.tar.gz")
    with pytest.raises(errors.IntegrityError):
        hubfast.resolve(local)
    assert [p for p in cache.iterdir() if not p.name.endswith(".lock")] == []


def test_pins_file_errors(monkeypatch, tmp_path):
    pins = tmp_path / "pins.txt"
    pins.write_text("https://tfhub.dev/google/mul/1 not-a-digest\n")
    monkeypatch.setenv("HUBFAST_PINS", str(pins))
    with pytest.raises(ValueError, match="pins.txt:1"):
        hubfast.resolve("https://tfhub.dev/google/mul/1")
    monkeypatch.setenv("HUBFAST_PINS", str(tmp_path / "missing.txt"))
    with pytest.raises(FileNotFoundError, match="HUBFAST_PINS"):
        hubfast.resolve("https://tfhub.dev/google/mul/1")
    monkeypatch.delenv("HUBFAST_PINS")
    with pytest.raises(ValueError, match="does not fetch"):
        resolvers.resolve_entry(str(tmp_path), sha256="0" * 64)


# Local paths, file://, os.PathLike ---------------------------------------------------------


def test_local_paths_file_urls_and_pathlike(model_src, archives, cache):
    assert hubfast.resolve(str(model_src)) == str(model_src)
    assert hubfast.resolve(model_src) == str(model_src)  # os.PathLike
    assert hubfast.resolve(model_src.as_uri()) == str(model_src)  # file://
    # Local archives, also as PathLike and file://, are extracted into the cache once.
    for h in [archives["gz"], archives["zst"].as_uri()]:
        path = hubfast.resolve(h)
        assert Path(path).parent == cache
        assert tree_digest(path) == tree_digest(model_src)
    with pytest.raises(OSError) as info:  # tensorflow_hub raises IOError here
        hubfast.resolve(str(model_src) + "-missing")
    assert isinstance(info.value, errors.NotFoundError)
    with pytest.raises(ValueError):
        hubfast.resolve(b"/bytes/handle")


# User resolvers ----------------------------------------------------------------------------


def test_user_resolver_with_tensorflow_hub_interface(model_src):
    class MyResolver:  # tensorflow_hub's interface: is_supported + __call__
        def __init__(self):
            self.calls = []

        def is_supported(self, handle):
            return handle.startswith("mymodels://")

        def __call__(self, handle):
            self.calls.append(handle)
            return pathlib.PurePath(model_src)  # a PathLike is fine

    mine = MyResolver()
    hubfast.register_resolver(mine)
    try:
        assert type(resolvers.chain()[0]).__name__ == "_CallableResolver"
        assert hubfast.resolve("mymodels://mul") == str(model_src)
        assert mine.calls == ["mymodels://mul"]
    finally:
        assert resolvers.unregister_resolver(mine)
    with pytest.raises(errors.NotFoundError):
        hubfast.resolve("mymodels://mul")
    with pytest.raises(TypeError):
        hubfast.register_resolver(object())


def test_user_resolver_subclass_fetching_through_the_cache(server, cache, archives, model_src):
    """A Resolver subclass mapping its own scheme to an archive URL gets the whole
    pipeline, with the entry named after its handle."""
    from hubfast import cache as cache_mod, http

    class Internal(hubfast.Resolver):
        def is_supported(self, handle):
            return handle.startswith("internal:")

        def resolve_entry(self, handle):
            url = server.url_for("/store/" + handle.split(":", 1)[1] + ".tar.zst")
            return cache_mod.fetch_entry(handle, url=url, fetch=http.fetch_options(url))

    server.add_archive("/store/mul.tar.zst", archives["zst"])
    r = Internal()
    hubfast.register_resolver(r)
    try:
        assert_entry(hubfast.resolve("internal:mul"), cache, "internal:mul", model_src)
    finally:
        resolvers.unregister_resolver(r)
    assert requests_of(server) == [("GET", "/store/mul.tar.zst", "")]
