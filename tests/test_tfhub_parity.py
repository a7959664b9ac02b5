"""hubfast against tensorflow_hub 0.16.1 itself, on the same loopback server:
which resolver takes each handle, the cache entry names, the URLs requested,
the files extracted, the UNCOMPRESSED location, and one cache shared both ways
(filled by one library, used by the other without a download).

tensorflow_hub runs once, in a subprocess (it imports TensorFlow: ~3-5 s), on a
list of operations; its requests are told apart from hubfast's in the server's
log by their User-Agent (urllib's vs hubfast's)."""
from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import urllib.parse
from pathlib import Path

import pytest

import hubfast
from hubfast import resolvers
from hubfast.server import TFHubServer
from hubfast.testing.models import pack_tar, tree_digest, write_mul_model

pytest.importorskip("tensorflow_hub")
pytestmark = pytest.mark.tf

# Settings that must not leak in from the outside (as in test_resolvers.py).
CLEARED_ENV = (
    "TFHUB_MODEL_LOAD_FORMAT", "TFHUB_DISABLE_CERT_VALIDATION", "TFHUB_DOWNLOAD_PROGRESS",
    "HUBFAST_MIRRORS", "HUBFAST_PINS", "HUBFAST_OFFLINE", "HUBFAST_CACHE_LAYERS",
    "HUBFAST_ENDPOINT_TFHUB", "HUBFAST_ENDPOINT_KAGGLE", "HUBFAST_ENDPOINT_GCS",
    "HUBFAST_ENDPOINT_CN", "HUBFAST_GCS_AUTH", "KAGGLE_USERNAME", "KAGGLE_KEY",
    "KAGGLE_CONFIG_DIR", "GOOGLE_APPLICATION_CREDENTIALS", "CLOUDSDK_CONFIG",
    "REQUESTS_CA_BUNDLE", "CURL_CA_BUNDLE", "SSL_CERT_FILE", "http_proxy", "https_proxy",
    "all_proxy", "HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY",
)

# tensorflow_hub's side: each op runs with its own environment changes.
TFHUB_DRIVER = r"""
import json, os, sys
ops = json.load(sys.stdin)
import tensorflow_hub as hub
from tensorflow_hub import compressed_module_resolver as cmr
from tensorflow_hub import registry
from tensorflow_hub import uncompressed_module_resolver as umr

def which(h):
    for impl in reversed(registry.resolver._impls):
        if impl.is_supported(h):
            return type(impl).__name__

def compressed_url(h):
    # HttpCompressedFileResolver.__call__'s download(): the China rule, else the query.
    if h.startswith(cmr._HUB_TF_GOOGLE_CN):
        return cmr._GCS_GOOGLE_CN_TEMPLATE % h[len(cmr._HUB_TF_GOOGLE_CN):]
    return cmr.HttpCompressedFileResolver()._append_compressed_format_query(h)

def uncompressed_location(h):
    r = umr.HttpUncompressedFileResolver()
    return r._request_gcs_location(r._append_uncompressed_format_query(h))

def load_call(h):
    return float(hub.load(h)(3.0).numpy())

FUNCS = {"resolve": hub.resolve, "module_dir": cmr._module_dir, "which": which,
         "compressed_url": compressed_url, "uncompressed_location": uncompressed_location,
         "load_call": load_call}
out = []
for op in ops:
    for k, v in op.get("env", {}).items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v
    try:
        out.append({"ok": FUNCS[op["op"]](op["handle"])})
    except Exception as e:
        out.append({"error": type(e).__name__, "message": str(e)})
print("RESULTS " + json.dumps(out))
"""

KAGGLE_PATH = "/models/acme/mul/tensorFlow2/default/1"

# tensorflow_hub resolver class -> hubfast resolver class.
SAME_RESOLVER = {
    "HttpCompressedFileResolver": "HttpCompressedResolver",
    "GcsCompressedFileResolver": "GcsCompressedResolver",
    "HttpUncompressedFileResolver": "HttpUncompressedResolver",
    "PathResolver": "PathResolver",
}


def sha1(s: str) -> str:
    return hashlib.sha1(s.encode("utf8")).hexdigest()


def run_tfhub(ops: list, env: dict) -> list:
    proc = subprocess.run([sys.executable, "-c", TFHUB_DRIVER], input=json.dumps(ops),
                          capture_output=True, text=True, env=env, timeout=300)
    lines = [l for l in proc.stdout.splitlines() if l.startswith("RESULTS ")]
    assert proc.returncode == 0 and lines, proc.stderr[-3000:]
    return json.loads(lines[-1][len("RESULTS "):])


def is_tfhub(record) -> bool:
    return (record.user_agent or "").startswith("Python-urllib")


def is_hubfast(record) -> bool:
    return (record.user_agent or "").startswith("hubfast/")


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """Runs the whole scenario once; the tests below check its parts."""
    root = tmp_path_factory.mktemp("parity")
    model = write_mul_model(root / "mul")  # obj(x) == 2 * x
    archive = pack_tar(model, root / "mul.tar.gz", "gz")
    caches = {k: root / k for k in ("shared", "tf", "hf", "names")}
    for d in caches.values():
        d.mkdir()
    local_archive = str(root / "mul.tar.gz")

    with TFHubServer() as srv, pytest.MonkeyPatch.context() as mp:
        for name in CLEARED_ENV:
            mp.delenv(name, raising=False)
        for path in ["/google/mul/1", "/google/mul/2", "/google/mul/3", "/google/mul/6",
                     "/files/mul.tar.gz", "/tfhub-modules/google/mul/5.tar.gz",
                     "/bucket/dir/mul.tar.gz", KAGGLE_PATH]:
            srv.add_archive(path, archive)
        srv.add_archive("/google/mul/4", archive, uncompressed_location="gs://bucket/mul/4")
        h = {
            "A": srv.url_for("/google/mul/1"),  # tensorflow_hub fills, hubfast reads
            "B": srv.url_for("/google/mul/2"),  # hubfast fills, tensorflow_hub reads
            "Q": srv.url_for("/google/mul/3", "b=2&a=&c=3"),  # both fetch: query handling
            "D": srv.url_for("/files/mul.tar.gz"),  # both fetch: a direct archive URL
            "U": srv.url_for("/google/mul/4"),  # UNCOMPRESSED
            # Public hosts, reached by hubfast through the endpoint overrides:
            "T": "https://tfhub.dev/google/mul/6",
            "K": "https://www.kaggle.com" + KAGGLE_PATH,
            "CN": "https://hub.tensorflow.google.cn/google/mul/5",
            "G": "gs://bucket/dir/mul.tar.gz",
        }
        others = {  # handles only classified and named
            "G_tgz": "gs://bucket/m.tgz", "G_tar": "gs://bucket/m.tar",
            "G_zst": "gs://bucket/m.tar.zst", "G_dir": "gs://bucket/dir",
            "local_dir": str(model), "local_archive": local_archive,
            "file_dir": Path(model).as_uri(), "CN_http": "http://hub.tensorflow.google.cn/a/1",
            "presigned": "https://storage.googleapis.com/b/m.tar.gz?X-Goog-Signature=abc",
        }
        mp.setenv("HUBFAST_GCS_AUTH", "off")
        for service in ("TFHUB", "KAGGLE", "CN", "GCS"):
            mp.setenv(f"HUBFAST_ENDPOINT_{service}", srv.url)

        # 1. hubfast fills.
        mp.setenv("TFHUB_CACHE_DIR", str(caches["shared"]))
        hubfast.resolve(h["B"])
        mp.setenv("TFHUB_CACHE_DIR", str(caches["hf"]))
        hf_paths = {k: hubfast.resolve(h[k]) for k in ("Q", "D", "T", "K", "CN", "G")}
        mp.setenv("TFHUB_MODEL_LOAD_FORMAT", "UNCOMPRESSED")
        hf_location = hubfast.resolve(h["U"])
        mp.delenv("TFHUB_MODEL_LOAD_FORMAT")
        hf_entries_after_uncompressed = sorted(os.listdir(caches["hf"]))

        # hubfast's resolver choices and entry names for every handle.
        all_handles = dict(h, **others)
        hf_which = {}
        for fmt in ("COMPRESSED", "AUTO", "UNCOMPRESSED"):
            mp.setenv("TFHUB_MODEL_LOAD_FORMAT", fmt)
            hf_which[fmt] = {k: type(resolvers.resolver_for(v)).__name__
                             for k, v in all_handles.items()}
        mp.delenv("TFHUB_MODEL_LOAD_FORMAT")
        hf_names = {k: resolvers.describe(v)["entry_name"] for k, v in all_handles.items()}
        hubfast_log_before_tfhub = len(srv.stats.log)

        # 2. tensorflow_hub, once.
        env = {k: v for k, v in os.environ.items() if k not in CLEARED_ENV}
        env.update(TF_CPP_MIN_LOG_LEVEL="3", TFHUB_CACHE_DIR=str(caches["shared"]))
        ops = [
            {"op": "resolve", "handle": h["B"]},
            {"op": "resolve", "handle": h["A"]},
            {"op": "load_call", "handle": h["A"]},
            {"op": "resolve", "handle": h["Q"], "env": {"TFHUB_CACHE_DIR": str(caches["tf"])}},
            {"op": "resolve", "handle": h["D"]},
            {"op": "uncompressed_location", "handle": h["U"]},
            {"op": "module_dir", "handle": "", "env": {"TFHUB_CACHE_DIR": str(caches["names"])}},
        ]
        keys = list(all_handles)
        ops += [{"op": "module_dir", "handle": all_handles[k]} for k in keys]
        ops += [{"op": "compressed_url", "handle": all_handles[k]} for k in keys]
        for fmt in ("COMPRESSED", "AUTO", "UNCOMPRESSED"):
            ops.append({"op": "which", "handle": "", "env": {"TFHUB_MODEL_LOAD_FORMAT": fmt}})
            ops += [{"op": "which", "handle": all_handles[k]} for k in keys]
        results = run_tfhub(ops, env)
        assert all("ok" in r for i, r in enumerate(results) if ops[i]["handle"]), results
        n = len(keys)
        tf = {
            "B": results[0]["ok"], "A": results[1]["ok"], "load_call": results[2]["ok"],
            "Q": results[3]["ok"], "D": results[4]["ok"], "location": results[5]["ok"],
            "names": dict(zip(keys, (r["ok"] for r in results[7:7 + n]))),
            "urls": dict(zip(keys, (r["ok"] for r in results[7 + n:7 + 2 * n]))),
            "which": {},
        }
        base = 7 + 2 * n
        for i, fmt in enumerate(("COMPRESSED", "AUTO", "UNCOMPRESSED")):
            start = base + i * (n + 1) + 1
            tf["which"][fmt] = dict(zip(keys, (r["ok"] for r in results[start:start + n])))
        log_after_tfhub = len(srv.stats.log)

        # 3. hubfast reads what tensorflow_hub filled, then loads through tfhub.dev.
        mp.setenv("TFHUB_CACHE_DIR", str(caches["shared"]))
        hf_a = hubfast.resolve(h["A"])
        mp.setenv("TFHUB_CACHE_DIR", str(caches["hf"]))
        hf_load = float(hubfast.load(h["T"])(3.0).numpy())
        log = srv.stats.log
        errors = srv.errors

    return {
        "handles": h, "others": others, "all": all_handles, "caches": caches, "model": model,
        "hf_paths": hf_paths, "hf_a": hf_a, "hf_location": hf_location, "hf_which": hf_which,
        "hf_names": hf_names, "hf_load": hf_load, "tf": tf, "log": log, "errors": errors,
        "hf_entries_after_uncompressed": hf_entries_after_uncompressed,
        "split": (hubfast_log_before_tfhub, log_after_tfhub),
    }


def requests(world, path, who=None, phase=None):
    lo, hi = world["split"]
    log = world["log"]
    if phase == "before":
        log = log[:lo]
    elif phase == "tfhub":
        log = log[lo:hi]
    elif phase == "after":
        log = log[hi:]
    return [(r.path, r.query) for r in log
            if r.path == path and (who is None or who(r))]


def test_server_saw_no_errors(world):
    assert world["errors"] == []


def test_resolver_choice_matches_tensorflow_hub(world):
    """Same resolver for every handle in every load format, except where hubfast
    deliberately accepts more (each listed with its reason)."""
    beyond = {
        # tensorflow_hub: a path that cannot be loaded / a request with the query appended.
        ("local_archive", "*"): "LocalArchiveResolver",  # extracted into the cache
        ("G_zst", "*"): "GcsCompressedResolver",  # .tar.zst archives on GCS
        ("D", "UNCOMPRESSED"): "HttpCompressedResolver",  # archives have no uncompressed form
        ("presigned", "UNCOMPRESSED"): "HttpCompressedResolver",
    }
    for fmt, tf_which in world["tf"]["which"].items():
        for key, tf_cls in tf_which.items():
            expected = beyond.get((key, fmt)) or beyond.get((key, "*")) or SAME_RESOLVER[tf_cls]
            assert world["hf_which"][fmt][key] == expected, (key, fmt, tf_cls)


def test_entry_names_match_tensorflow_hub(world):
    for key, module_dir in world["tf"]["names"].items():
        assert Path(module_dir).parent == world["caches"]["names"]
        if world["hf_which"]["COMPRESSED"][key] in ("HttpCompressedResolver",
                                                    "GcsCompressedResolver"):
            assert world["hf_names"][key] == Path(module_dir).name == sha1(world["all"][key])
    # And where hubfast fetched (through the endpoint overrides), that is the directory.
    for key, path in world["hf_paths"].items():
        assert Path(path).name == Path(world["tf"]["names"][key]).name
        assert Path(path).parent == world["caches"]["hf"]


def test_request_urls_match_tensorflow_hub(world):
    """The path and query hubfast sent equal those of the URL tensorflow_hub computes
    (for public hosts, hubfast reached the override instead of the host)."""
    for key in ("Q", "T", "K", "CN"):
        url = urllib.parse.urlsplit(world["tf"]["urls"][key])
        assert requests(world, urllib.parse.unquote(url.path), is_hubfast, "before") == [
            (urllib.parse.unquote(url.path), url.query)], key
    # tensorflow_hub drops blank query values and appends: hubfast does exactly the same.
    assert requests(world, "/google/mul/3", is_hubfast) == [
        ("/google/mul/3", "b=2&c=3&tf-hub-format=compressed")]
    assert requests(world, "/google/mul/3", is_tfhub) == requests(world, "/google/mul/3",
                                                                  is_hubfast)
    # gs:// objects come from the GCS endpoint, object path as is, no query.
    assert requests(world, "/bucket/dir/mul.tar.gz") == [("/bucket/dir/mul.tar.gz", "")]


def test_direct_archive_url_is_fetched_as_given(world):
    """The one deliberate difference on the wire: tensorflow_hub appends the query even
    to an archive URL (which breaks presigned URLs); hubfast does not. Same entry, same files."""
    assert requests(world, "/files/mul.tar.gz", is_tfhub) == [
        ("/files/mul.tar.gz", "tf-hub-format=compressed")]
    assert requests(world, "/files/mul.tar.gz", is_hubfast) == [("/files/mul.tar.gz", "")]
    assert world["tf"]["urls"]["presigned"].endswith("X-Goog-Signature=abc&tf-hub-format=compressed")
    assert resolvers.describe(world["others"]["presigned"])["url"] == world["others"]["presigned"]


def test_extracted_files_equal_tensorflow_hubs(world):
    for key in ("Q", "D"):
        tf_path, hf_path = Path(world["tf"][key]), Path(world["hf_paths"][key])
        assert tf_path.parent == world["caches"]["tf"]
        assert tf_path.name == hf_path.name == sha1(world["handles"][key])
        assert tree_digest(tf_path) == tree_digest(hf_path) == tree_digest(world["model"])


def test_tensorflow_hub_cache_is_used_by_hubfast(world):
    a = world["handles"]["A"]
    assert world["tf"]["A"] == world["hf_a"] == str(world["caches"]["shared"] / sha1(a))
    assert requests(world, "/google/mul/1", is_tfhub) == [
        ("/google/mul/1", "tf-hub-format=compressed")]
    assert requests(world, "/google/mul/1", is_hubfast) == []  # no download by hubfast
    assert tree_digest(world["hf_a"]) == tree_digest(world["model"])


def test_hubfast_cache_is_used_by_tensorflow_hub(world):
    b = world["handles"]["B"]
    assert world["tf"]["B"] == str(world["caches"]["shared"] / sha1(b))
    assert requests(world, "/google/mul/2", is_hubfast) == [
        ("/google/mul/2", "tf-hub-format=compressed")]
    assert requests(world, "/google/mul/2", is_tfhub) == []  # no download by tensorflow_hub
    # tensorflow_hub loaded a model from the shared cache (A, filled by itself): 2 * 3.
    assert world["tf"]["load_call"] == 6.0


def test_uncompressed_location_matches_tensorflow_hub(world):
    assert world["hf_location"] == world["tf"]["location"] == "gs://bucket/mul/4"
    assert requests(world, "/google/mul/4", is_tfhub) == requests(
        world, "/google/mul/4", is_hubfast) == [("/google/mul/4", "tf-hub-format=uncompressed")]
    assert not any(name.startswith(sha1(world["handles"]["U"]))
                   for name in world["hf_entries_after_uncompressed"])


def test_hubfast_load_through_tfhub_dev_endpoint(world):
    assert world["hf_load"] == 6.0
    assert requests(world, "/google/mul/6", is_hubfast) == [
        ("/google/mul/6", "tf-hub-format=compressed")]
