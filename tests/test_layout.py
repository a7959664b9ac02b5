"""hubfast itself imports nothing from hubfast.testing: `hubfast serve` and every other
production module work with the test helpers absent (a wheel could ship without them)."""
from __future__ import annotations

import ast
import json
import pkgutil
import subprocess
import sys
import urllib.request
from pathlib import Path

import hubfast

PACKAGE = Path(hubfast.__file__).resolve().parent


def _production_modules() -> list:
    return [m.name for m in pkgutil.iter_modules([str(PACKAGE)])
            if m.name not in ("testing", "__main__") and (PACKAGE / f"{m.name}.py").exists()]


def _imports_testing(node: ast.AST) -> bool:
    if isinstance(node, ast.ImportFrom):
        mod = node.module or ""
        return (node.level > 0 and (mod == "testing" or mod.startswith("testing.")
                                    or (not mod and any(a.name == "testing" for a in node.names)))) \
            or mod == "hubfast.testing" or mod.startswith("hubfast.testing.")
    if isinstance(node, ast.Import):
        return any(a.name == "hubfast.testing" or a.name.startswith("hubfast.testing.") for a in node.names)
    return False


def test_no_production_module_imports_testing():
    """Every import statement, at any depth, except type-only ones under TYPE_CHECKING."""
    bad = []
    for name in _production_modules():
        tree = ast.parse((PACKAGE / f"{name}.py").read_text())
        type_only = {id(n) for node in ast.walk(tree) if isinstance(node, ast.If)
                     and getattr(node.test, "id", "") == "TYPE_CHECKING" for n in ast.walk(node)}
        bad += [f"{name}.py:{n.lineno}" for n in ast.walk(tree)
                if _imports_testing(n) and id(n) not in type_only]
    assert bad == []


_BLOCKER = """
import sys
class _Block:
    def find_spec(self, name, path=None, target=None):
        if name == "hubfast.testing" or name.startswith("hubfast.testing."):
            raise ImportError("hubfast.testing is blocked")
sys.meta_path.insert(0, _Block())
"""


def test_hubfast_serve_runs_without_the_test_helpers(tmp_path):
    """With hubfast.testing unimportable, every production module imports, and `hubfast
    serve` serves an archive (a real request over loopback)."""
    # Modules built on TensorFlow (feature columns, Keras layers, the TF1 module protos) are skipped where it is
    # absent (the matrix's TensorFlow-free runs); any other import error fails.
    code = _BLOCKER + (
        "import importlib\n"
        "for m in sys.argv[1:]:\n"
        "    try: importlib.import_module('hubfast.' + m)\n"
        "    except ModuleNotFoundError as e:\n"
        "        if e.name not in ('tensorflow', 'tf_keras', 'keras', 'google.protobuf'): raise\n")
    p = subprocess.run([sys.executable, "-c", code, *_production_modules()],
                       capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stderr
    archive = tmp_path / "m.tar.gz"
    archive.write_bytes(b"served as is")
    code = _BLOCKER + "import runpy\nsys.argv[0] = 'hubfast'\nrunpy.run_module('hubfast', run_name='__main__')\n"
    serve = subprocess.Popen([sys.executable, "-c", code, "serve", str(archive), "--json"],
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        line = serve.stdout.readline()
        assert line, serve.communicate(timeout=10)[1]
        url = json.loads(line)["url"]
        with urllib.request.urlopen(url + "?tf-hub-format=compressed", timeout=10) as resp:
            assert resp.read() == b"served as is"
    finally:
        serve.terminate()
        serve.wait(10)
