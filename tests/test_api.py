"""The TensorFlow-facing API end to end, each case in a fresh process (the
pytest process never imports TensorFlow): load() semantics and parity with
tensorflow_hub, install(), prefetch, many processes loading one handle, and
tf.distribute. Models are written by the tests and served on loopback."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from hubfast.testing import models
from hubfast.server import TFHubServer

pytest.importorskip("tensorflow")  # spec check only: not imported here
pytestmark = pytest.mark.tf

PYTHONPATH = str(Path(__import__("hubfast").__file__).resolve().parents[1])


def run_py(code: str, cache: Path, timeout: float = 180, **env) -> dict:
    e = dict(os.environ, TFHUB_CACHE_DIR=str(cache), TF_CPP_MIN_LOG_LEVEL="3",
             PYTHONPATH=PYTHONPATH + os.pathsep + os.environ.get("PYTHONPATH", ""))
    e.update({k: str(v) for k, v in env.items()})
    p = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], env=e, capture_output=True,
                       text=True, timeout=timeout)
    assert p.returncode == 0, p.stderr[-4000:]
    return json.loads(p.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    """The seed page's MyMulModel and a TF1 Hub format module, served as .tar.gz."""
    d = tmp_path_factory.mktemp("models")
    code = f"""
        from hubfast.testing import models
        models.write_mul_model({str(d / 'mul')!r})
        models.write_tf1_hub_module({str(d / 'tf1')!r})
        models.write_gaussian_model({str(d / 'big')!r}, 8 << 20)
        print("{{}}")
    """
    run_py(code, d / "unused-cache")
    archives = {name: models.pack_tar(str(d / name), str(d / f"{name}.tar.gz"), "gz")
                for name in ("mul", "tf1", "big")}
    with TFHubServer() as srv:
        for name, a in archives.items():
            srv.add_archive(f"/test/{name}/1", a)
        yield srv


def test_import_hubfast_does_not_import_tensorflow(tmp_path):
    out = run_py("""
        import json, sys
        import hubfast
        before = "tensorflow" in sys.modules
        hubfast.resolve  # the TF-free API
        layer_cls = hubfast.KerasLayer  # a lazy name: imports TensorFlow now
        print(json.dumps({"before": before, "after": "tensorflow" in sys.modules}))
    """, tmp_path)
    assert out == {"before": False, "after": True}


def test_load_semantics_and_parity_with_tensorflow_hub(served, tmp_path):
    out = run_py(f"""
        import json
        import tensorflow as tf
        import tensorflow_hub
        import hubfast as hub
        mul = hub.load({served.url + '/test/mul/1'!r})
        y = mul(tf.constant([10., 20.])).numpy().tolist()
        reg = float(mul.regularization_losses[0]())
        tf1 = hub.load({served.url + '/test/tf1/1'!r})
        sig = tf1.signatures["default"](x=tf.constant([[1., 2.]]))["default"].numpy().tolist()
        opts = hub.load({served.url + '/test/mul/1'!r},
                        options=tf.saved_model.LoadOptions(experimental_io_device="/job:localhost"))
        ref = tensorflow_hub.load({served.url + '/test/tf1/1'!r})
        ref_sig = ref.signatures["default"](x=tf.constant([[1., 2.]]))["default"].numpy().tolist()
        err = None
        try:
            hub.load(42)
        except ValueError as e:
            err = str(e)
        print(json.dumps({{"y": y, "reg": reg, "v1": tf1._is_hub_module_v1,
                          "mul_v1": mul._is_hub_module_v1, "sig": sig, "ref_sig": ref_sig,
                          "opts": opts(tf.constant([1.])).numpy().tolist(), "err": err}}))
    """, tmp_path)
    assert out["y"] == [20.0, 40.0]
    assert out["reg"] == pytest.approx(0.004)
    assert out["v1"] is True and out["mul_v1"] is False
    assert out["sig"] == out["ref_sig"]
    assert out["opts"] == [2.0]
    assert "Expected a string" in out["err"]


def test_install_routes_tensorflow_hub_through_hubfast(served, tmp_path):
    served.reset_stats()
    out = run_py(f"""
        import json
        import tensorflow as tf
        import tensorflow_hub
        import hubfast
        hubfast.install()
        m = tensorflow_hub.load({served.url + '/test/mul/1'!r})
        s = hubfast.last_stats()
        print(json.dumps({{"y": m(tf.constant([1.])).numpy().tolist(), "downloaded": not s["cached"],
                          "files": s.get("files")}}))
    """, tmp_path)
    assert out["y"] == [2.0] and out["downloaded"] and out["files"] >= 2
    agents = {r.user_agent for r in served.stats.requests_for("/test/mul/1")}
    assert agents and all(a.startswith("hubfast/") for a in agents), agents


def test_prefetch_then_load_downloads_once(served, tmp_path):
    served.reset_stats()
    out = run_py(f"""
        import json, sys
        import hubfast
        pending = hubfast.prefetch({served.url + '/test/big/1'!r})
        assert "tensorflow" not in sys.modules
        import tensorflow as tf
        m = hubfast.load({served.url + '/test/big/1'!r})
        y = m(tf.ones([1, 16]))
        print(json.dumps({{"done": pending.done(), "path": pending.result(),
                          "downloaded": not pending.stats["cached"]}}))
    """, tmp_path)
    assert out["done"] and out["downloaded"]
    assert served.stats.path("/test/big/1").archive_gets == 1


def test_load_starts_the_fetch_before_importing_tensorflow(served, tmp_path):
    served.reset_stats()
    out = run_py(f"""
        import json, sys, time
        import hubfast
        from hubfast import prefetch
        m = hubfast.load({served.url + '/test/big/1'!r})   # TensorFlow not imported yet
        print(json.dumps({{"tf": "tensorflow" in sys.modules}}))
    """, tmp_path)
    assert out["tf"]
    assert served.stats.path("/test/big/1").archive_gets == 1


def test_four_processes_loading_one_handle_download_once(served, tmp_path):
    served.reset_stats()
    code = f"""
        import json
        import hubfast, tensorflow as tf
        m = hubfast.load({served.url + '/test/big/1'!r})
        print(json.dumps({{"y": float(tf.reduce_sum(m(tf.ones([1, 16]))))}}))
    """
    e = dict(os.environ, TFHUB_CACHE_DIR=str(tmp_path / "shared"), TF_CPP_MIN_LOG_LEVEL="3",
             PYTHONPATH=PYTHONPATH)
    procs = [subprocess.Popen([sys.executable, "-c", textwrap.dedent(code)], env=e, text=True,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE) for _ in range(4)]
    outs = [p.communicate(timeout=240) for p in procs]
    assert all(p.returncode == 0 for p in procs), [o[1][-2000:] for o in outs]
    ys = {json.loads(o[0].strip().splitlines()[-1])["y"] for o in outs}
    assert len(ys) == 1
    assert served.stats.path("/test/big/1").archive_gets == 1


def test_load_under_mirrored_strategy(served, tmp_path):
    out = run_py(f"""
        import json
        import tensorflow as tf
        cpu = tf.config.list_physical_devices("CPU")[0]
        tf.config.set_logical_device_configuration(
            cpu, [tf.config.LogicalDeviceConfiguration()] * 2)
        import hubfast
        strategy = tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"])
        with strategy.scope():
            m = hubfast.load({served.url + '/test/mul/1'!r})
        per_replica = strategy.run(lambda x: m(x), args=(tf.constant([3.]),))
        vals = [t.numpy().tolist() for t in strategy.experimental_local_results(per_replica)]
        print(json.dumps({{"replicas": strategy.num_replicas_in_sync, "vals": vals}}))
    """, tmp_path)
    assert out["replicas"] == 2
    assert out["vals"] == [[6.0], [6.0]]


def test_prefetch_threads_run_at_background_priority(tmp_path):
    """The prefetch thread and the native threads its fetch starts (decoder, writer,
    connections) run with nice +HUBFAST_PREFETCH_NICE, so a fetch overlapping
    `import tensorflow` leaves the import its core; the caller's thread keeps its own."""
    src = tmp_path / "m"
    (src / "variables").mkdir(parents=True)
    (src / "saved_model.pb").write_bytes(b"pb")
    (src / "variables" / "variables.data-00000-of-00001").write_bytes(os.urandom(8 << 20))
    archive = models.pack_tar(str(src), str(tmp_path / "m.tar.gz"), "gz")
    code = """
        import json, os, threading, time
        import hubfast

        def nices():
            out = {}
            for tid in os.listdir("/proc/self/task"):
                try:
                    with open(f"/proc/self/task/{tid}/stat") as f:
                        out[int(tid)] = int(f.read().rsplit(")", 1)[1].split()[16])
                except (FileNotFoundError, ProcessLookupError):
                    pass  # the thread ended meanwhile
            return out

        before = nices()
        p = hubfast.prefetch(URL)
        seen = {}
        deadline = time.time() + 60
        while not p.done() and time.time() < deadline:
            for tid, n in nices().items():
                if tid not in before:
                    seen[tid] = n
            time.sleep(0.01)
        p.result()
        print(json.dumps({"main": nices()[threading.get_native_id()],
                          "base": before[threading.get_native_id()], "new": sorted(seen.values())}))
    """
    with TFHubServer(bandwidth=8 << 20) as srv:  # ~1 s: the threads are seen running
        srv.add_archive("/m/1", archive)
        code = code.replace("URL", repr(srv.url_for("/m/1")))
        out = run_py(code, tmp_path / "cache")
        off = run_py(code, tmp_path / "cache2", HUBFAST_PREFETCH_NICE="0")
    assert out["main"] == out["base"]
    assert len(out["new"]) >= 3, out  # prefetch thread + native pipeline threads
    assert all(n == min(19, out["base"] + 10) for n in out["new"]), out
    assert all(n == off["base"] for n in off["new"]) and len(off["new"]) >= 3, off


def test_load_restores_the_cycle_collector_as_it_found_it(served, tmp_path):
    """load() pauses Python's gc while TensorFlow reads the SavedModel: afterwards it is on
    again if it was on, stays off if the program had turned it off, and is back on after a
    load that failed."""
    out = run_py(f"""
        import gc, json
        import tensorflow as tf
        import hubfast as hub
        url = {served.url_for('/test/mul/1')!r}
        hub.load(url)
        on_after_load = gc.isenabled()
        gc.disable()
        hub.load(url)
        off_kept = not gc.isenabled()
        gc.enable()
        try:
            hub.load(url, tags=["no-such-tag"])
            failed = False
        except Exception:
            failed = True
        print(json.dumps({{"on_after_load": on_after_load, "off_kept": off_kept,
                           "failed": failed, "on_after_failure": gc.isenabled()}}))
    """, tmp_path)
    assert out == {"on_after_load": True, "off_kept": True, "failed": True,
                   "on_after_failure": True}
