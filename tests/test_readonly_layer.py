"""The fleet recipe: a cache layer filled once by root with `hubfast fetch`, then read by
load(), KerasLayer and Module from a read-only mount, offline, as an unprivileged user.

Real pieces only: a tmpfs remounted read-only, a user the test creates with useradd, real
SavedModels read by real TensorFlow. /root is 0700, so the child imports hubfast and
TensorFlow first and then drops to the user's uid."""
from __future__ import annotations

import json
import os
import pwd
import secrets
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

import hubfast
from hubfast.testing import models

PYTHONPATH = str(Path(hubfast.__file__).resolve().parents[1])

pytestmark = [pytest.mark.skipif(os.geteuid() != 0, reason="needs root: mounts and useradd"),
              pytest.mark.tf]  # load(), KerasLayer and Module run TensorFlow

# The child: loads both models through all three APIs, then reports what it saw.
CHILD = """
import json, os, sys
import numpy as np
import hubfast as hub
import tensorflow as tf
import hubfast.module_v1, hubfast.keras_layer
uid, gid = int(sys.argv[1]), int(sys.argv[2])
os.setgroups([]); os.setgid(gid); os.setuid(uid)
out = {}
try:
    obj = hub.load(sys.argv[3])
    out["load"] = float(obj(tf.constant(3.0)).numpy())
    layer = hub.KerasLayer(sys.argv[3])
    out["keras"] = [float(v) for v in layer(tf.constant([1.0, 2.0])).numpy()]
    with tf.Graph().as_default():
        m = hub.Module(sys.argv[4])
        y = m(tf.constant([[1.0, 1.0]]))
        with tf.compat.v1.Session() as sess:
            sess.run(tf.compat.v1.global_variables_initializer())
            out["module"] = [float(v) for v in sess.run(y)[0]]
except Exception as e:
    out["error"] = f"{type(e).__name__}: {e}"
print(json.dumps(out))
"""


@pytest.fixture(scope="module")
def user():
    """A real unprivileged user, removed afterwards."""
    if shutil.which("useradd") is None:
        pytest.skip("useradd is not installed")
    name = "hfro" + secrets.token_hex(4)
    subprocess.run(["useradd", "--no-create-home", "--shell", "/usr/sbin/nologin", name],
                   check=True, capture_output=True)
    try:
        yield pwd.getpwnam(name)
    finally:
        subprocess.run(["userdel", name], capture_output=True)


@pytest.fixture(scope="module")
def archives():
    """Two archives in a directory everyone can read: a TF2 SavedModel and a TF1 Hub module."""
    d = Path(tempfile.mkdtemp(prefix="hubfast-layer-src-"))
    os.chmod(d, 0o755)
    try:
        mul = models.pack_tar(models.write_mul_model(d / "mul"), d / "mul.tar.gz")
        tf1 = models.pack_tar(models.write_tf1_hub_module(d / "tf1"), d / "tf1.tar.gz")
        for p in (mul, tf1):
            os.chmod(p, 0o644)
        yield mul, tf1
    finally:
        shutil.rmtree(d, ignore_errors=True)


@pytest.fixture
def layer(archives):
    """A tmpfs that root fills with `hubfast fetch`; everyone can read it."""
    mnt = Path(tempfile.mkdtemp(prefix="hubfast-layer-"))
    os.chmod(mnt, 0o755)
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=16m,mode=0755", "tmpfs", str(mnt)],
                       capture_output=True, text=True)
    if r.returncode != 0:
        os.rmdir(mnt)
        pytest.skip(f"cannot mount a tmpfs here: {r.stderr.strip()}")
    try:
        cache = mnt / "layer"
        for a in archives:
            p = subprocess.run([sys.executable, "-m", "hubfast", "fetch", a, "--cache-dir", str(cache)],
                               env=dict(os.environ, PYTHONPATH=PYTHONPATH), capture_output=True,
                               text=True, timeout=120)
            assert p.returncode == 0, p.stderr
        yield mnt, cache
    finally:
        subprocess.run(["umount", "-l", str(mnt)])
        os.rmdir(mnt)


def _run(user, cache: Path, archives, as_root: bool = False) -> dict:
    home = Path(tempfile.mkdtemp(prefix="hubfast-layer-home-"))
    os.chown(home, user.pw_uid, user.pw_gid)
    try:
        env = dict(os.environ, PYTHONPATH=PYTHONPATH, HUBFAST_CACHE_LAYERS=str(cache),
                   HUBFAST_OFFLINE="1", TFHUB_CACHE_DIR=str(home / "cache"), HOME=str(home),
                   TF_CPP_MIN_LOG_LEVEL="2")
        uid, gid = (0, 0) if as_root else (user.pw_uid, user.pw_gid)
        p = subprocess.run([sys.executable, "-c", CHILD, str(uid), str(gid), *archives], env=env,
                           capture_output=True, text=True, timeout=300, cwd=str(home))
        assert p.returncode == 0, p.stderr[-3000:]
        out = json.loads(p.stdout.strip().splitlines()[-1])
        assert not (home / "cache").exists() or not any((home / "cache").iterdir())
        return out
    finally:
        shutil.rmtree(home, ignore_errors=True)


WANT = {"load": 6.0, "keras": [2.0, 4.0], "module": [5.5, 6.5, 10.0]}


def _drop_use_files(cache: Path) -> None:
    """As a layer filled by tensorflow_hub (or an older hubfast) has none."""
    for p in cache.glob("*.hubfast.use"):
        p.unlink()


@pytest.mark.parametrize("use_files", ["kept", "missing"])
def test_read_only_layer_loads_as_unprivileged_user(user, layer, archives, use_files):
    mnt, cache = layer
    if use_files == "missing":
        _drop_use_files(cache)
    subprocess.run(["mount", "-o", "remount,ro", str(mnt)], check=True)
    before = sorted(os.listdir(cache))
    assert _run(user, cache, archives) == WANT
    if use_files == "missing":  # root too: it may not create the use-lock file either
        assert _run(user, cache, archives, as_root=True) == WANT
    assert sorted(os.listdir(cache)) == before


def test_root_filled_layer_loads_as_unprivileged_user(user, layer, archives):
    """A writable mount the user may not write: the use-lock file is missing."""
    _, cache = layer
    _drop_use_files(cache)
    before = sorted(os.listdir(cache))
    assert _run(user, cache, archives) == WANT
    assert sorted(os.listdir(cache)) == before
