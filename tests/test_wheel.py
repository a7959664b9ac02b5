"""The wheel: `dev/wheel` builds a manylinux wheel that bundles its native libraries;
installed with --no-deps into a fresh venv WITHOUT system site-packages (so no
TensorFlow, no zstandard, nothing from the build machine's Python), hubfast imports,
extracts archives, and its command fetches over HTTP through the bundled libcurl.

Slow (the build takes a minute or two): marked `slow`. HUBFAST_WHEEL=<path> tests an
existing wheel instead of building one. HUBFAST_WHEEL_TF=1 also installs tensorflow-cpu
and zstandard into the demo's venv instead of letting it see the machine's TensorFlow.
"""
from __future__ import annotations

import json
import os
import select
import signal
import subprocess
import sys
import tarfile
import zipfile
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

TOP = Path(__file__).resolve().parents[1]


def _clean_env(**extra: str) -> dict:
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("PYTHON", "TFHUB_", "HUBFAST_", "VIRTUAL_ENV"))}
    env.update(extra)
    return env


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    given = os.environ.get("HUBFAST_WHEEL")
    if given:
        return Path(given)
    out = tmp_path_factory.mktemp("dist")
    p = subprocess.run(["bash", str(TOP / "dev" / "wheel"), str(out)], capture_output=True,
                       text=True, timeout=1800, env=_clean_env(PYTHON=sys.executable))
    assert p.returncode == 0, p.stderr[-5000:]
    path = Path(p.stdout.strip().splitlines()[-1])
    assert path.exists(), p.stdout
    return path


@pytest.fixture(scope="module")
def venv(wheel, tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("venv") / "v"
    subprocess.run([sys.executable, "-m", "venv", str(d)], check=True, timeout=300)
    cfg = (d / "pyvenv.cfg").read_text()
    assert "include-system-site-packages = false" in cfg
    subprocess.run([str(d / "bin" / "pip"), "install", "--no-deps", "--quiet", str(wheel)],
                   check=True, timeout=600, env=_clean_env())
    return d


def test_wheel_is_manylinux_and_bundles_its_libraries(wheel):
    assert "manylinux" in wheel.name, wheel.name
    with zipfile.ZipFile(wheel) as z:
        names = z.namelist()
    libs = [n.split("/")[-1] for n in names if n.startswith("hubfast.libs/")]
    for lib in ("libcurl", "libisal", "libzstd", "liblzma", "libbz2", "libssl", "libcrypto",
                "libtorrent-rasterbar"):
        assert any(n.startswith(lib) for n in libs), (lib, libs)
    assert any(n.startswith("hubfast/_core") and n.endswith(".so") for n in names)
    for module in ("cli", "maintenance", "pack", "__main__"):
        assert f"hubfast/{module}.py" in names
    entry_points = [n for n in names if n.endswith("entry_points.txt")]
    with zipfile.ZipFile(wheel) as z:
        assert "hubfast = hubfast.cli:main" in z.read(entry_points[0]).decode()
    show = subprocess.run([sys.executable, "-m", "auditwheel", "show", str(wheel)],
                          capture_output=True, text=True)
    if show.returncode == 0:
        assert "manylinux" in show.stdout


IN_VENV = r"""
import json, os, sys, tarfile, tempfile
import hubfast
from hubfast import _core
assert hubfast.__file__.startswith(sys.prefix), (hubfast.__file__, sys.prefix)
assert "tensorflow" not in sys.modules
src = sys.argv[1]
work = tempfile.mkdtemp()
archive = os.path.join(work, "m.tar.gz")
from hubfast.pack import pack
pack(src, archive, gzip_tool="python")
dest = os.path.join(work, "out")
os.mkdir(dest)
st = _core.extract(dest, path=archive)
path = hubfast.resolve(archive)
torrent = _core.make_torrent(archive, web_seeds=["http://mirror.test/m.tar.gz"])
print(json.dumps({"files": st["files"], "compression": st["compression"], "path": path,
                  "isal": _core.have_isal(), "tree": sorted(os.listdir(path)),
                  "core": _core.__file__, "swarm": _core.have_swarm(),
                  "info_hash_v2": torrent["info_hash_v2"]}))
"""


def _model(tmp_path: Path) -> Path:
    src = tmp_path / "model"
    (src / "variables").mkdir(parents=True)
    (src / "saved_model.pb").write_bytes(b"pb" * 1000)
    (src / "variables" / "variables.index").write_bytes(b"i" * 100)
    (src / "variables" / "variables.data-00000-of-00001").write_bytes(os.urandom(1 << 20))
    return src


def test_wheel_in_a_fresh_venv_without_tensorflow(venv, tmp_path):
    py, hubfast_cmd = str(venv / "bin" / "python"), str(venv / "bin" / "hubfast")
    src = _model(tmp_path)
    env = _clean_env(TFHUB_CACHE_DIR=str(tmp_path / "cache"))
    p = subprocess.run([py, "-c", IN_VENV, str(src)], capture_output=True, text=True,
                       cwd=tmp_path, env=env, timeout=120)
    assert p.returncode == 0, p.stderr
    doc = json.loads(p.stdout)
    assert doc["files"] == 3 and doc["compression"] == "gzip" and doc["isal"]
    assert doc["swarm"] and len(doc["info_hash_v2"]) == 64  # libtorrent, bundled
    assert doc["core"].startswith(str(venv)) and doc["tree"] == ["saved_model.pb", "variables"]
    # The bundled libraries are the ones loaded.
    ldd = subprocess.run(["ldd", doc["core"]], capture_output=True, text=True).stdout
    assert "hubfast.libs/libcurl" in ldd and "hubfast.libs/libtorrent-rasterbar" in ldd, ldd

    # The console script: --help, then fetch a local archive and an HTTP one.
    p = subprocess.run([hubfast_cmd, "--help"], capture_output=True, text=True, env=env)
    assert p.returncode == 0 and "fetch" in p.stdout
    archive = tmp_path / "m.tar.gz"
    with tarfile.open(archive, "w:gz") as t:
        t.add(src, arcname=".")
    p = subprocess.run([hubfast_cmd, "fetch", str(archive)], capture_output=True, text=True,
                       env=env, timeout=120)
    assert p.returncode == 0, p.stderr
    assert (Path(p.stdout.strip()) / "saved_model.pb").exists()
    serve = subprocess.Popen([hubfast_cmd, "serve", str(archive), "--json"], env=env,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        ready, _, _ = select.select([serve.stdout], [], [], 60)
        assert ready, serve.stderr.read() if serve.poll() is not None else "no output"
        url = json.loads(serve.stdout.readline())["url"]
        p = subprocess.run([hubfast_cmd, "fetch", "--json", url], capture_output=True,
                           text=True, env=env, timeout=120)
        assert p.returncode == 0, p.stderr
        res = json.loads(p.stdout)["results"][0]
        assert res["ok"] and res["stats"]["compression"] == "gzip"
    finally:
        serve.send_signal(signal.SIGTERM)
        serve.wait(timeout=30)
    p = subprocess.run([hubfast_cmd, "ls", "--json"], capture_output=True, text=True, env=env)
    assert p.returncode == 0 and len(json.loads(p.stdout)["entries"]) == 3  # 3 archives
    # `pack` to .tar.zst says what is missing (zstandard is an extra).
    p = subprocess.run([hubfast_cmd, "pack", str(src), "-o", str(tmp_path / "m.tar.zst")],
                       capture_output=True, text=True, env=env)
    assert p.returncode == 1 and "hubfast[pack]" in p.stderr


def test_wheel_runs_the_demo_with_tensorflow(wheel, tmp_path):
    """The README's main job from the wheel: a fresh venv that sees the machine's
    TensorFlow (an optional extra the user brings) but hubfast only from the wheel.
    HUBFAST_WHEEL_TF=1 installs tensorflow-cpu into a venv of its own instead (slow)."""
    full = os.environ.get("HUBFAST_WHEEL_TF") == "1"
    d = tmp_path / "v"
    subprocess.run([sys.executable, "-m", "venv", str(d)]
                   + ([] if full else ["--system-site-packages"]), check=True, timeout=300)
    pip = str(d / "bin" / "pip")
    # --ignore-installed: the machine's own hubfast is visible through the system
    # site-packages and would otherwise count as already installed.
    subprocess.run([pip, "install", "--no-deps", "--ignore-installed", "--quiet", str(wheel)],
                   check=True, timeout=600, env=_clean_env())
    if full:
        subprocess.run([pip, "install", "--quiet", "tensorflow-cpu", "zstandard"], check=True,
                       timeout=1800, env=_clean_env())
    py = str(d / "bin" / "python")
    where = subprocess.run([py, "-c", "import hubfast._core as c; print(c.__file__)"],
                           capture_output=True, text=True, cwd="/", env=_clean_env())
    assert where.stdout.startswith(str(d)), where.stdout + where.stderr
    p = subprocess.run([py, "-m", "hubfast.testing.demo", "--size-mib", "16", "--workdir",
                        str(tmp_path / "work")],
                       capture_output=True, text=True, timeout=1200, cwd="/",
                       env=_clean_env(TFHUB_CACHE_DIR=str(tmp_path / "cache")))
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    assert "hubfast" in p.stdout and "cold" in p.stdout.lower(), p.stdout[-3000:]
