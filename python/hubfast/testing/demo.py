"""The demo: builds a real SavedModel, serves it from hubfast's loopback TF Hub
server, and loads it cold and warm with ``hubfast.load`` in fresh processes, next to
tensorflow_hub when it is installed.

    python -m hubfast.testing.demo [--size-mib 256] [--workdir DIR] [--keep]

Everything it writes (the model, its archives, one cache per row) goes in a fresh
temporary directory, removed at the end unless ``--keep``; ``--workdir DIR`` builds in
DIR instead and keeps it (a second run reuses the model and archives).
"""
from __future__ import annotations

import argparse
import importlib.util
import os
import shutil
import subprocess
import sys
import tempfile

def _run(style: str, url: str, cache: str, progress: bool) -> dict:
    from . import coldstart

    return coldstart.run(style, url, cache, progress)


def _build(workdir: str, size_mib: int) -> tuple:
    from . import models

    model = os.path.join(workdir, "model")
    if not os.path.exists(os.path.join(model, "saved_model.pb")):
        print(f"building a {size_mib} MiB SavedModel (float32 Gaussian weights) ...", flush=True)
        code = ("import sys; from hubfast.testing import models; "
                "models.write_gaussian_model(sys.argv[1], int(sys.argv[2]) << 20)")
        env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3")
        subprocess.run([sys.executable, "-c", code, model, str(size_mib)], check=True, env=env)
    gz = os.path.join(workdir, "model.tar.gz")
    zst = os.path.join(workdir, "model.tar.zst")
    if not os.path.exists(gz):
        print("packing model.tar.gz (gzip -6, like tfhub.dev) ...", flush=True)
        models.pack_tar(model, gz, "gz")
    if not os.path.exists(zst):
        print("packing model.tar.zst (multi-frame zstd) ...", flush=True)
        models.pack_tar(model, zst, "zst", zstd_frame_size=32 << 20)
    return gz, zst


def _size(path: str) -> int:
    if os.path.isfile(path):
        return os.path.getsize(path)
    total = 0
    for root, _dirs, files in os.walk(path):
        for f in files:
            try:
                total += os.lstat(os.path.join(root, f)).st_size
            except OSError:
                pass
    return total


def _report(workdir: str) -> None:
    """Where the demo put things, and how much each takes."""
    print(f"\nin {workdir}:")
    for name in sorted(os.listdir(workdir)):
        print(f"  {name:24s} {_size(os.path.join(workdir, name)) / 2**20:8.0f} MiB")
    print(f"  {'total':24s} {_size(workdir) / 2**20:8.0f} MiB")


def _warm_tensorflow() -> None:
    """One untimed `import tensorflow`, so that every timed row imports it from a warm page
    cache: the first process to import it after boot pays seconds of disk reads, and that row
    would look slower for a reason that is not the loader's."""
    print("importing TensorFlow once, untimed, so that every row starts from the same warm page cache ...",
          flush=True)
    subprocess.run([sys.executable, "-c", "import tensorflow"], check=True,
                   env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3"))


def main(argv=None) -> int:
    # Before anything imports TensorFlow: its INFO lines would land inside the progress bar.
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size-mib", type=int, default=256)
    ap.add_argument("--workdir", help="build here and keep it (default: a fresh temporary directory)")
    ap.add_argument("--keep", action="store_true", help="keep the temporary directory")
    ap.add_argument("--no-baseline", action="store_true", help="skip tensorflow_hub")
    args = ap.parse_args(argv)
    keep = args.keep or args.workdir is not None
    workdir = args.workdir or tempfile.mkdtemp(prefix="hubfast-demo-")
    os.makedirs(workdir, exist_ok=True)
    try:
        _demo(args, workdir)
        _report(workdir)
    finally:
        if keep:
            print(f"kept {workdir}" + ("" if args.workdir else " (--keep): remove it with rm -rf"))
        else:
            shutil.rmtree(workdir, ignore_errors=True)
            print(f"removed {workdir} (--keep keeps it)")
    return 0


def _demo(args: argparse.Namespace, workdir: str) -> None:
    gz, zst = _build(workdir, args.size_mib)
    baseline = not args.no_baseline and importlib.util.find_spec("tensorflow_hub") is not None
    if not args.no_baseline and not baseline:
        print("(tensorflow_hub is not installed: no baseline row)")

    from ..server import TFHubServer

    _warm_tensorflow()
    rows = []
    with TFHubServer() as srv:
        srv.add_archive("/hubfast-demo/gaussian/1", gz)
        srv.add_archive("/hubfast-demo/gaussian-zst/1.tar.zst", zst)
        url_gz = srv.url + "/hubfast-demo/gaussian/1"
        url_zst = srv.url + "/hubfast-demo/gaussian-zst/1.tar.zst"
        print(f"serving on {srv.url}: {url_gz}  ({os.path.getsize(gz) / 2**20:.0f} MiB .tar.gz)")

        def fresh_cache(tag: str) -> str:
            d = os.path.join(workdir, f"cache-{tag}")
            shutil.rmtree(d, ignore_errors=True)
            return d

        if baseline:
            print("tensorflow_hub.load, cold (.tar.gz) ...", flush=True)
            rows.append(("tensorflow_hub cold .tar.gz",
                         _run("tensorflow_hub", url_gz, fresh_cache("tensorflow_hub"), False)))
        print("hubfast.load, cold (.tar.gz), with progress:", flush=True)
        cache = fresh_cache("hubfast")
        rows.append(("hubfast cold .tar.gz", _run("seed", url_gz, cache, True)))
        rows.append(("hubfast cold .tar.gz + prefetch",
                     _run("prefetch", url_gz, fresh_cache("prefetch"), False)))
        rows.append(("hubfast cold .tar.zst + prefetch",
                     _run("prefetch", url_zst, fresh_cache("zst"), False)))
        rows.append(("hubfast warm (cached)", _run("seed", url_gz, cache, False)))

    base = rows[0][1]["spawn_to_usable"] if baseline else None
    print(f"\n{'':34s} {'spawn->usable':>13s} {'vs tfhub':>8s} {'import':>7s} {'load':>7s}"
          f" {'1st call':>8s} {'fetch':>7s}")
    for name, r in rows:
        fetch = f"{r['fetch']:7.2f}" if r.get("fetch") else "      -"
        ratio = f"{r['spawn_to_usable'] / base:7.2f}x" if base else "       -"
        print(f"{name:34s} {r['spawn_to_usable']:13.2f} {ratio} {r['import']:7.2f} {r['load']:7.2f}"
              f" {r['first_call']:8.2f} {fetch}")
    print("\n(seconds, each row a fresh process after the same warm `import tensorflow`; 'load' is"
          " hub.load, including the download for a cold cache; with prefetch the download overlaps"
          " `import tensorflow`)")


if __name__ == "__main__":
    sys.exit(main())
