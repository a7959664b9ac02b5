"""Runs TensorFlow test cases in subprocesses, so that each test file chooses its Keras.

Why subprocesses: which Keras ``tf.keras`` means (Keras 3, or tf_keras with
``TF_USE_LEGACY_KERAS=1``) is fixed when TensorFlow is imported, logical
devices for ``tf.distribute`` must be configured before the first op runs, and
memory measurements need a fresh process. The pytest process itself never
imports TensorFlow (other test files check that ``import hubfast`` does not).

How a test file uses it::

    import tf_helpers as th

    CASES = th.Cases(__file__, env={"TF_USE_LEGACY_KERAS": "1"})

    @CASES.case
    def case_seed_mul(ctx):          # runs in the worker process
        tf, keras, hub = ctx.imports()
        ...                          # plain asserts; pytest.skip() works too

    @pytest.mark.parametrize("name", CASES.shared_names())
    def test_case(cases_session, name):
        cases_session.check(name)    # reported one by one by pytest

Cases marked ``@CASES.case(fresh=True)`` are not part of the shared session:
a test runs each in its own process with :meth:`Cases.run_fresh`. A case may
return a JSON-serialisable value; the test side finds it in the result's
``"data"``.

The worker is this file run as a script::

    python tests/tf_helpers.py --module tests/test_x.py --workdir DIR --out R.json NAME...
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import os
import subprocess
import sys
import time
import traceback
from pathlib import Path
from typing import Any, Callable, Dict, Iterable, List, Optional

TESTS_DIR = Path(__file__).resolve().parent
REPO_DIR = TESTS_DIR.parent
PYTHON_DIR = REPO_DIR / "python"


# ---------------------------------------------------------------------------
# Test side
# ---------------------------------------------------------------------------


def worker_env(extra: Optional[Dict[str, str]] = None,
               cache_dir: Optional[Path] = None) -> Dict[str, str]:
    """The environment of a worker: this checkout first on the path, quiet TensorFlow."""
    env = dict(os.environ)
    # The hubfast this pytest process imported (the checkout with PYTHONPATH=python,
    # or the installed package on CI, where the checkout has no compiled _core).
    import hubfast

    paths = [str(Path(hubfast.__file__).resolve().parents[1]), str(TESTS_DIR)]
    if env.get("PYTHONPATH"):
        paths.append(env["PYTHONPATH"])
    env["PYTHONPATH"] = os.pathsep.join(paths)
    env.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    env.pop("TF_USE_LEGACY_KERAS", None)
    if cache_dir is not None:
        env["TFHUB_CACHE_DIR"] = str(cache_dir)
    env.update(extra or {})
    return env


class Run:
    """One worker process running some cases; results are read when it ends."""

    def __init__(self, cases: "Cases", names: List[str], workdir: Path,
                 env: Optional[Dict[str, str]] = None, timeout: float = 600.0) -> None:
        self.names = list(names)
        self.workdir = Path(workdir)
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.out = self.workdir / "results.json"
        self.timeout = timeout
        self.started = time.monotonic()
        merged = dict(cases.env)
        merged.update(env or {})
        cmd = [sys.executable, str(Path(__file__).resolve()), "--module", str(cases.module_file),
               "--workdir", str(self.workdir), "--out", str(self.out)] + self.names
        self._stdout = open(self.workdir / "stdout.txt", "wb")
        self._stderr = open(self.workdir / "stderr.txt", "wb")
        self.proc = subprocess.Popen(cmd, env=worker_env(merged, self.workdir / "tfhub_cache"),
                                     cwd=str(self.workdir), stdout=self._stdout,
                                     stderr=self._stderr)
        self.returncode: Optional[int] = None
        self.timed_out = False
        self.results: Dict[str, Dict[str, Any]] = {}

    def wait(self) -> "Run":
        if self.returncode is not None:
            return self
        left = self.timeout - (time.monotonic() - self.started)
        try:
            self.returncode = self.proc.wait(timeout=max(left, 1.0))
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.returncode = self.proc.wait()
            self.timed_out = True
        self._stdout.close()
        self._stderr.close()
        if self.out.exists():
            self.results = json.loads(self.out.read_text())
        return self

    def stderr_tail(self, n: int = 4000) -> str:
        try:
            text = (self.workdir / "stderr.txt").read_text(errors="replace")
        except OSError:
            return ""
        return text[-n:]

    def result(self, name: str) -> Dict[str, Any]:
        """The result of case `name`, turned into pytest's outcome (fail / skip) if not passed."""
        import pytest

        self.wait()
        res = self.results.get(name)
        if res is None:
            why = "timed out" if self.timed_out else f"exit status {self.returncode}"
            pytest.fail(f"case {name!r} did not report ({why}; the worker may have crashed "
                        f"in it or before it).\n--- worker stderr (tail) ---\n{self.stderr_tail()}")
        if res["status"] == "skipped":
            pytest.skip(res.get("reason", ""))
        if res["status"] != "passed":
            pytest.fail(f"case {name!r} failed in the worker ({res['seconds']:.1f} s):\n"
                        f"{res.get('traceback', '')}", pytrace=False)
        return res

    def check(self, name: str) -> Any:
        return self.result(name).get("data")


class Cases:
    """The registry of one test file's cases, and how to run them."""

    def __init__(self, module_file: str, env: Optional[Dict[str, str]] = None) -> None:
        self.module_file = Path(module_file).resolve()
        self.env = dict(env or {})
        self.functions: Dict[str, Callable[["Ctx"], Any]] = {}
        self.fresh: Dict[str, bool] = {}

    def case(self, fn: Optional[Callable] = None, *, fresh: bool = False):
        """Registers ``case_<name>`` (decorator, with or without arguments)."""
        def register(f: Callable) -> Callable:
            name = f.__name__
            if name.startswith("case_"):
                name = name[len("case_"):]
            if name in self.functions:
                raise ValueError(f"duplicate case {name}")
            self.functions[name] = f
            self.fresh[name] = fresh
            return f

        return register(fn) if fn is not None else register

    def shared_names(self) -> List[str]:
        return [n for n, fresh in self.fresh.items() if not fresh]

    def fresh_names(self) -> List[str]:
        return [n for n, fresh in self.fresh.items() if fresh]

    def session(self, request: Any, workdir: Path, param: str = "name") -> Run:
        """Starts the shared worker for the cases this pytest session selected."""
        selected: List[str] = []
        for item in request.session.items:
            callspec = getattr(item, "callspec", None)
            if getattr(item, "module", None) is request.module and callspec is not None:
                name = callspec.params.get(param)
                if name in self.functions and not self.fresh[name] and name not in selected:
                    selected.append(name)
        return Run(self, selected or self.shared_names(), workdir)

    def start_fresh(self, name: str, workdir: Path, env: Optional[Dict[str, str]] = None,
                    timeout: float = 300.0) -> Run:
        return Run(self, [name], workdir, env=env, timeout=timeout)

    def run_fresh(self, name: str, workdir: Path, env: Optional[Dict[str, str]] = None,
                  timeout: float = 300.0) -> Any:
        return self.start_fresh(name, workdir, env, timeout).check(name)


def run_python(code: str, env: Dict[str, str], timeout: float = 300.0,
               cwd: Optional[str] = None) -> subprocess.CompletedProcess:
    """Runs ``python -c code`` with `env` (see :func:`worker_env`), capturing output."""
    return subprocess.run([sys.executable, "-c", code], env=env, cwd=cwd, timeout=timeout,
                          capture_output=True, text=True)


# ---------------------------------------------------------------------------
# Worker side
# ---------------------------------------------------------------------------


def write_scaled_model(path: str, v_init: float = 2.0) -> str:
    """A Reusable SavedModel whose ``__call__`` takes an extra argument (for ``arguments=``).

    ``obj(x, scale)`` returns ``x * v * scale`` (``scale`` a float32 scalar;
    ``v`` a trainable variable, 2.0); ``signatures["serving_default"](x=, scale=)``
    returns ``{"out": the same}``.
    """
    import tensorflow as tf

    class Scaled(tf.train.Checkpoint):
        def __init__(self) -> None:
            super().__init__()
            self.v = tf.Variable(float(v_init), name="v")
            self.variables = [self.v]
            self.trainable_variables = [self.v]
            self.regularization_losses = []

        @tf.function(input_signature=[tf.TensorSpec(None, tf.float32, name="x"),
                                      tf.TensorSpec([], tf.float32, name="scale")])
        def __call__(self, x, scale):
            return x * self.v * scale

        @tf.function(input_signature=[tf.TensorSpec([None], tf.float32, name="x"),
                                      tf.TensorSpec([], tf.float32, name="scale")])
        def serve(self, x, scale):
            return {"out": self.__call__(x, scale)}

    module = Scaled()
    tf.saved_model.save(module, path, signatures={"serving_default": module.serve})
    return path


def expected_sgd_step(obj, x, y, lr):
    """kernel and bias of a :func:`hubfast.testing.models.write_training_model` object after
    one SGD step on ``mse(Dense_ones(obj(x, training=True)), y) + regularization``, computed
    with a bare GradientTape on the SavedModel's variables (which are left unchanged)."""
    import tensorflow as tf

    mm0 = obj.moving_mean.numpy().copy()
    with tf.GradientTape() as tape:
        h = obj(tf.constant(x), training=True)
        pred = tf.reduce_sum(h, axis=-1, keepdims=True)  # Dense(1, "ones"), zero bias
        loss = tf.reduce_mean(tf.square(pred - y)) + obj.regularization_losses[0]()
    gk, gb = tape.gradient(loss, [obj.kernel, obj.bias])
    obj.moving_mean.assign(mm0)
    return obj.kernel.numpy() - lr * gk.numpy(), obj.bias.numpy() - lr * gb.numpy()


class Ctx:
    """What a case gets: a work directory, lazily written models, the right imports."""

    MODEL_WRITERS = {
        "mul": ("hubfast.testing.models", "write_mul_model"),
        "text": ("hubfast.testing.models", "write_text_embedding_model"),
        "training": ("hubfast.testing.models", "write_training_model"),
        "tf1": ("hubfast.testing.models", "write_tf1_hub_module"),
        "scaled": ("tf_helpers", "write_scaled_model"),
    }

    def __init__(self, workdir: Path) -> None:
        self.workdir = Path(workdir)
        self._models: Dict[str, str] = {}
        self._counter = 0

    def imports(self):
        """``(tensorflow, the Keras that tf.keras means, hubfast)``."""
        import tensorflow as tf

        import hubfast

        version_fn = getattr(tf.keras, "version", None)
        if version_fn is not None and version_fn().startswith("3."):
            import keras
        else:
            import tf_keras as keras
        return tf, keras, hubfast

    def model(self, kind: str) -> str:
        """The directory of a model of `kind` (written once per process)."""
        if kind not in self._models:
            module, fn = self.MODEL_WRITERS[kind]
            writer = getattr(importlib.import_module(module), fn)
            path = self.workdir / "models" / kind
            path.parent.mkdir(parents=True, exist_ok=True)
            self._models[kind] = writer(str(path))
        return self._models[kind]

    def tmp(self, prefix: str = "tmp") -> Path:
        """A new empty directory under the work directory."""
        self._counter += 1
        path = self.workdir / f"{prefix}-{self._counter}"
        path.mkdir(parents=True)
        return path


def invalid_keras_layer_outcomes(H: Any, tf: Any, text: str, mul: str) -> Dict[str, Any]:
    """The exception type name (or None) of each invalid KerasLayer use, for module `H`
    (hubfast or tensorflow_hub); `text` and `mul` are the Ctx models of those names."""
    attempts = {
        "signature without output_key": lambda: H.KerasLayer(text, signature="serving_default"),
        "output_key and as_dict": lambda: H.KerasLayer(
            text, signature="serving_default", output_key="default",
            signature_outputs_as_dict=True),
        "as_dict without signature": lambda: H.KerasLayer(mul, signature_outputs_as_dict=True),
        "unknown signature": lambda: H.KerasLayer(text, signature="nope", output_key="x"),
        "callable with tags": lambda: H.KerasLayer(H.load(mul), tags=["serve"]),
        "callable with load_options": lambda: H.KerasLayer(
            H.load(mul), load_options=tf.saved_model.LoadOptions()),
        "output_key on a tensor": lambda: H.KerasLayer(mul, output_key="x")(tf.ones([2])),
        "unknown output_key": lambda: H.KerasLayer(
            text, signature="serving_default", output_key="nope")(
                {"sentences": tf.constant(["a"])}),
        "trainable signature": lambda: H.KerasLayer(
            text, trainable=True, signature="serving_default", output_key="default")(
                {"sentences": tf.constant(["a"])}),
        "config of a callable": lambda: H.KerasLayer(H.load(mul)).get_config(),
    }
    result: Dict[str, Any] = {}
    for what, attempt in attempts.items():
        try:
            attempt()
            result[what] = None
        except Exception as e:  # noqa: BLE001
            result[what] = type(e).__name__
    return result


def rss_bytes() -> int:
    """This process's resident set size (Linux)."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no VmRSS in /proc/self/status")


def _json_default(x: Any) -> Any:
    if hasattr(x, "tolist"):
        return x.tolist()
    return repr(x)


def worker_main(argv: Iterable[str]) -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--module", required=True)
    parser.add_argument("--workdir", required=True)
    parser.add_argument("--out", required=True)
    parser.add_argument("names", nargs="*")
    args = parser.parse_args(list(argv))

    import pytest

    module_file = Path(args.module).resolve()
    spec = importlib.util.spec_from_file_location("hubfast_cases_" + module_file.stem,
                                                  module_file)
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod
    spec.loader.exec_module(mod)
    registry = next(v for v in vars(mod).values() if isinstance(v, Cases))
    ctx = Ctx(Path(args.workdir))
    results: Dict[str, Dict[str, Any]] = {}
    out = Path(args.out)
    for name in args.names:
        t0 = time.monotonic()
        res: Dict[str, Any]
        try:
            data = registry.functions[name](ctx)
            res = {"status": "passed", "data": data}
        except pytest.skip.Exception as e:
            res = {"status": "skipped", "reason": str(e)}
        except BaseException:  # noqa: BLE001 - reported to the test side
            res = {"status": "failed", "traceback": traceback.format_exc()}
        res["seconds"] = time.monotonic() - t0
        results[name] = res
        tmp = out.with_suffix(".tmp")
        tmp.write_text(json.dumps(results, default=_json_default, indent=1))
        os.replace(tmp, out)
        print(f"[{res['status']}] {name} {res['seconds']:.2f}s", file=sys.stderr, flush=True)
    return 0


if __name__ == "__main__":
    sys.path.insert(0, str(TESTS_DIR))
    import tf_helpers  # the same module as the test files import, not a __main__ copy

    sys.exit(tf_helpers.worker_main(sys.argv[1:]))
