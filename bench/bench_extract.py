"""Extraction of a local archive: hubfast's native extractor next to the
machine's floors (igzip -dc, zstd -dc, tar) and Python's tarfile (the way
tensorflow_hub extracts), in one run.

    python bench/bench_extract.py [--sizes 1024] [--runs 3]    (--quick: 64 MiB)
"""
from __future__ import annotations

import argparse
import tarfile
from pathlib import Path

import common


def hubfast_extract(archive: Path):
    from hubfast import _core

    def run():
        _core.extract(str(common.fresh_dir("hubfast")), path=str(archive))
    return run


def tarfile_extract(archive: Path):
    def run():
        dest = common.fresh_dir("tarfile")
        with open(archive, "rb") as f, tarfile.open(fileobj=f, mode="r|*") as tar:
            for member in tar:  # tensorflow_hub's loop: stream mode, one member at a time
                tar.extract(member, dest, filter="data")
    return run


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--sizes", default="1024")
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--quick", action="store_true")
    args = ap.parse_args()
    sizes = [64] if args.quick else [int(s) for s in args.sizes.split(",")]
    report = []
    for size in sizes:
        gz, zst = common.archive(size, "gz"), common.archive(size, "zst")
        for a in (gz, zst):
            common.drop_page_cache_of(a)
        scratch = common.WORK / "scratch"
        tools = [
            ("hubfast .tar.gz", hubfast_extract(gz)),
            ("hubfast .tar.zst", hubfast_extract(zst)),
            ("igzip -dc > /dev/null", common.sh(f"igzip -dc {gz} > /dev/null")),
            ("gzip -dc > /dev/null", common.sh(f"gzip -dc {gz} > /dev/null")),
            ("zstd -dc > /dev/null", common.sh(f"zstd -qdc {zst} > /dev/null")),
            ("tar -xzf", common.sh(f"rm -rf {scratch}/tar && mkdir -p {scratch}/tar && "
                                   f"tar -xzf {gz} -C {scratch}/tar")),
            ("tar --zstd -xf", common.sh(f"rm -rf {scratch}/tarz && mkdir -p {scratch}/tarz && "
                                         f"tar -I zstd -xf {zst} -C {scratch}/tarz")),
            ("python tarfile .tar.gz (tensorflow_hub's way)", tarfile_extract(gz)),
            ("cp -r of the tree (write floor)", common.sh(f"rm -rf {scratch}/cp && cp -r "
                                                          f"{common.model_dir(size)} {scratch}/cp")),
        ]
        rows = []
        for name, fn in tools:
            r = common.measure(fn, args.runs)
            rows.append(dict(r, tool=name, size_mib=size))
            print(f"{size:5d} MiB  {name:45s} {r['median']:6.2f} s  [{r['min']:.2f}-{r['max']:.2f}]",
                  flush=True)
        common.record("extract", rows)
        report.append(f"### {size} MiB model (.tar.gz {gz.stat().st_size / 2**20:.0f} MiB, "
                      f".tar.zst {zst.stat().st_size / 2**20:.0f} MiB)\n\n"
                      + common.table(rows, "python tarfile .tar.gz (tensorflow_hub's way)",
                                     "igzip -dc > /dev/null"))
    m = common.machine()
    text = (f"## Extraction from a local archive ({m['time']}, {m['cores']} cores, "
            f"load {' '.join(m['loadavg'])})\n\nMedian of {args.runs} runs, min-max; 'vs' columns:"
            " speed-up over tarfile, and time relative to the igzip floor (lower is better).\n\n"
            + "\n\n".join(report) + "\n")
    (common.OUT / "extract.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
