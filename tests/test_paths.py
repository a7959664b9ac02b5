"""``file://`` URLs wherever tensorflow_hub takes a path (TFHUB_CACHE_DIR, handles, export
directories), and a directory that is no SavedModel refused with a clear ValueError."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

import tf_helpers as th
from hubfast import paths

CASES = th.Cases(__file__)


def _url(path: Path) -> str:
    return "file://" + str(path)


def test_local_path_forms():
    assert paths.local_path("file:///abs/dir") == "/abs/dir"
    assert paths.local_path("FILE:///abs/dir") == "/abs/dir"
    assert paths.local_path("file://localhost/abs/dir") == "/abs/dir"
    assert paths.local_path("file:///abs/a%20b") == "/abs/a b"
    assert paths.local_path(Path("/abs/dir")) == "/abs/dir"
    for untouched in ("/abs/dir", "rel/dir", "gs://bucket/dir", "https://host/m.tar.gz"):
        assert paths.local_path(untouched) == untouched
    # A host would be dropped by TensorFlow (file://rel/dir means /dir there): refused.
    with pytest.raises(ValueError, match="host 'rel'"):
        paths.local_path("file://rel/dir")


def _archive(tmp_path: Path) -> Path:
    src = tmp_path / "src"
    (src / "variables").mkdir(parents=True)
    (src / "saved_model.pb").write_bytes(b"not parsed by resolve()")
    (src / "variables" / "variables.index").write_bytes(b"x" * 100)
    archive = tmp_path / "m.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(src, arcname=".")
    return archive


def test_cache_dir_as_file_url(tmp_path, monkeypatch):
    """TFHUB_CACHE_DIR=file:///abs/cache fills /abs/cache, and the path returned exists."""
    import hubfast

    cache = tmp_path / "cache"
    cache.mkdir()
    work = tmp_path / "cwd"
    work.mkdir()
    monkeypatch.chdir(work)
    monkeypatch.setenv("TFHUB_CACHE_DIR", _url(cache))
    path = hubfast.resolve(str(_archive(tmp_path)))
    assert os.path.dirname(path) == str(cache)
    assert sorted(os.listdir(path)) == ["saved_model.pb", "variables"]
    assert os.listdir(work) == [], "wrote into a relative ./file: directory"


def test_file_url_handle_and_cli_cache_dir(tmp_path):
    import hubfast

    model = tmp_path / "model"
    model.mkdir()
    assert hubfast.resolve(_url(model)) == str(model)
    cache = tmp_path / "cli_cache"
    cache.mkdir()
    proc = subprocess.run([sys.executable, "-m", "hubfast", "ls", "--json", "--cache-dir",
                           _url(cache)], env=th.worker_env(), capture_output=True, text=True,
                          timeout=60, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["cache_dir"] == str(cache)


# ---------------------------------------------------------------------------
# Cases that need TensorFlow (run in a worker)
# ---------------------------------------------------------------------------


@CASES.case
def case_incomplete_model_is_a_value_error(ctx):
    """A directory without saved_model.pb(txt): hubfast.NotAModelError, a ValueError (as
    tensorflow_hub), naming the directory, from load() and KerasLayer alike."""
    tf, keras, hub = ctx.imports()
    incomplete = ctx.tmp("incomplete")
    (incomplete / "variables").mkdir()
    (incomplete / "variables" / "variables.index").write_bytes(b"")
    for make in (hub.load, hub.KerasLayer):
        with pytest.raises(hub.NotAModelError) as info:
            make(str(incomplete))
        assert isinstance(info.value, ValueError) and isinstance(info.value, hub.HubfastError)
        msg = str(info.value)
        assert "contains neither saved_model.pb nor saved_model.pbtxt" in msg, msg
        assert str(incomplete) in msg, msg
    # A real model in the same place loads.
    assert float(hub.load(ctx.model("mul"))(tf.constant(3.0))) == 6.0


@CASES.case
def case_export_and_load_tf1_module_by_file_url(ctx):
    """Module.export and ModuleSpec.export write to a file:// URL's directory; Module and
    load_module_spec read it back by the same URL."""
    import numpy as np

    tf, keras, hub = ctx.imports()
    v1 = tf.compat.v1

    def module_fn():
        x = v1.placeholder(tf.float32, [None, 2])
        w = v1.get_variable("w", initializer=[[1.0], [2.0]])
        hub.add_signature(inputs=x, outputs=tf.matmul(x, w))

    target = ctx.tmp("export") / "module"
    with tf.Graph().as_default():
        m = hub.Module(hub.create_module_spec(module_fn))
        with v1.Session() as sess:
            sess.run(v1.global_variables_initializer())
            sess.run(m.variable_map["w"].assign([[3.0], [4.0]]))
            m.export(_url(target), sess)
    assert (target / "tfhub_module.pb").is_file()
    again = ctx.tmp("respec") / "module"
    hub.load_module_spec(_url(target)).export(_url(again))
    for where in (target, again):
        with tf.Graph().as_default():
            y = hub.Module(_url(where))(tf.constant([[1.0, 1.0]]))
            with v1.Session() as sess:
                sess.run(v1.global_variables_initializer())
                np.testing.assert_allclose(sess.run(y), [[7.0]])
    assert sorted(os.listdir(target.parent)) == ["module"], "temp dirs left behind"


@pytest.fixture(scope="module")
def paths_session(request, tmp_path_factory):
    run = CASES.session(request, tmp_path_factory.mktemp("paths_cases"))
    yield run
    run.wait()


@pytest.mark.tf
@pytest.mark.parametrize("name", CASES.shared_names())
def test_case(paths_session, name):
    paths_session.check(name)
