"""The demo: builds a real SavedModel, serves it from the embedded loopback
TF Hub server, and loads it cold and warm with ``hubfast.load`` in fresh
processes, next to tensorflow_hub when it is installed.

    python -m hubfast.demo [--size-mib 256] [--workdir DIR]
"""
from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile

def _run(style: str, url: str, cache: str, progress: bool) -> dict:
    from .testing import coldstart

    return coldstart.run(style, url, cache, progress)


def _build(workdir: str, size_mib: int) -> tuple:
    from .testing import models

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


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size-mib", type=int, default=256)
    ap.add_argument("--workdir", default=os.path.join(tempfile.gettempdir(), "hubfast-demo"))
    ap.add_argument("--no-baseline", action="store_true", help="skip tensorflow_hub")
    args = ap.parse_args(argv)
    os.makedirs(args.workdir, exist_ok=True)
    gz, zst = _build(args.workdir, args.size_mib)

    from .testing.server import TFHubServer

    rows = []
    with TFHubServer() as srv:
        srv.add_archive("/hubfast-demo/gaussian/1", gz)
        srv.add_archive("/hubfast-demo/gaussian-zst/1.tar.zst", zst)
        url_gz = srv.url + "/hubfast-demo/gaussian/1"
        url_zst = srv.url + "/hubfast-demo/gaussian-zst/1.tar.zst"
        print(f"serving on {srv.url}: {url_gz}  ({os.path.getsize(gz) / 2**20:.0f} MiB .tar.gz)")

        def fresh_cache(tag: str) -> str:
            d = os.path.join(args.workdir, f"cache-{tag}")
            shutil.rmtree(d, ignore_errors=True)
            return d

        print("\nhubfast.load, cold (.tar.gz), with progress:", flush=True)
        cache = fresh_cache("hubfast")
        rows.append(("hubfast cold .tar.gz", _run("seed", url_gz, cache, True)))
        rows.append(("hubfast warm", _run("seed", url_gz, cache, False)))
        rows.append(("hubfast cold .tar.gz + prefetch",
                     _run("prefetch", url_gz, fresh_cache("prefetch"), False)))
        rows.append(("hubfast cold .tar.zst + prefetch",
                     _run("prefetch", url_zst, fresh_cache("zst"), False)))
        if not args.no_baseline:
            try:
                import tensorflow_hub  # noqa: F401
                rows.append(("tensorflow_hub cold .tar.gz",
                             _run("tensorflow_hub", url_gz, fresh_cache("tfhub"), False)))
            except Exception as e:  # the baseline is optional
                print(f"(tensorflow_hub baseline skipped: {e})")

    print(f"\n{'':34s} {'spawn->usable':>13s} {'import':>7s} {'load':>7s} {'1st call':>8s}"
          f" {'fetch':>7s}")
    for name, r in rows:
        fetch = f"{r['fetch']:7.2f}" if r.get("fetch") else "      -"
        print(f"{name:34s} {r['spawn_to_usable']:13.2f} {r['import']:7.2f} {r['load']:7.2f}"
              f" {r['first_call']:8.2f} {fetch}")
    print("\n(seconds; 'load' is hub.load including the download for a cold cache;"
          " with prefetch the download overlaps `import tensorflow`)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
