"""The native extractor: round trips, integrity, hostile archives, Ctrl-C, memory.

Round trips pack random trees with Python's tarfile in every format and
compression and compare the extracted tree byte for byte. Hostile and corrupt
archives come from fixtures/make_hostile.py; each must raise its own error
class (or succeed inside the target), write nothing outside the target, and
leave the cache as it was.
"""
from __future__ import annotations

import bz2
import functools
import gzip
import hashlib
import io
import json
import lzma
import os
import random
import shutil
import signal
import stat
import struct
import subprocess
import sys
import tarfile
import tempfile
import textwrap
import time
import zlib
from pathlib import Path
from typing import Dict, Optional

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import hubfast
from hubfast import _core, errors

FIXTURES = Path(__file__).resolve().parent / "fixtures"
sys.path.insert(0, str(FIXTURES))
import make_hostile  # noqa: E402

MiB = 1 << 20
PYTHONPATH = str(Path(hubfast.__file__).resolve().parents[1])

CASES = {c.name: c for c in make_hostile.cases()}

# Core bugs found by these tests, by test id; each stays xfail(strict) until fixed.
# (Fixed so far: old-style directories with a trailing '/', reserved gzip FLG bits under ISA-L.)
KNOWN_CORE_BUGS: dict = {}


def _param(name: str, *extra, id_suffix: str = ""):
    test_id = name + id_suffix
    marks = ()
    if test_id in KNOWN_CORE_BUGS:
        marks = (pytest.mark.xfail(strict=True, reason=KNOWN_CORE_BUGS[test_id]),)
    return pytest.param(name, *extra, marks=marks, id=test_id)


# --------------------------------------------------------------------------
# helpers

def read_tree(root: Path) -> Dict[str, Optional[bytes]]:
    """Relative path -> file bytes, or None for a directory; refuses anything else."""
    out: Dict[str, Optional[bytes]] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for n in dirnames + filenames:
            p = Path(dirpath, n)
            rel = str(p.relative_to(root))
            st_ = p.lstat()
            if stat.S_ISDIR(st_.st_mode):
                out[rel] = None
            elif stat.S_ISREG(st_.st_mode):
                out[rel] = p.read_bytes()
            else:
                raise AssertionError(f"{p} is neither a file nor a directory: {stat.filemode(st_.st_mode)}")
    return out


def assert_plain_tree(root: Path) -> None:
    """Only regular files and directories, none setuid/setgid/sticky or group/world-writable."""
    for dirpath, dirnames, filenames in os.walk(root):
        for n in dirnames + filenames:
            p = Path(dirpath, n)
            m = p.lstat().st_mode
            assert stat.S_ISDIR(m) or stat.S_ISREG(m), f"{p}: {stat.filemode(m)}"
            if stat.S_ISREG(m):
                assert p.lstat().st_nlink == 1, f"{p} is a hard link"
            assert not m & (stat.S_ISUID | stat.S_ISGID | stat.S_ISVTX | stat.S_IWGRP | stat.S_IWOTH), \
                f"{p}: {stat.filemode(m)}"


def snapshot(root: Path, exclude=()) -> Dict[str, tuple]:
    """Every path beneath root (not following links) with its kind, size and content digest."""
    exclude = [Path(e) for e in exclude]
    out = {}
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = [d for d in dirnames if Path(dirpath, d) not in exclude]
        for n in dirnames + filenames:
            p = Path(dirpath, n)
            st_ = p.lstat()
            digest = hashlib.sha256(p.read_bytes()).hexdigest() if stat.S_ISREG(st_.st_mode) else None
            out[str(p.relative_to(root))] = (stat.S_IFMT(st_.st_mode), st_.st_size, st_.st_nlink, digest)
    return out


def assert_cache_clean(cache: Path) -> None:
    """No entry, no temp directory, no manifest or descriptor: at most lock files."""
    left = sorted(p.name for p in cache.iterdir())
    for name in left:
        p = cache / name
        assert p.is_file() and not p.is_symlink() and name.endswith(".lock"), \
            f"the cache holds {name!r} after a failure: {left}"


def assert_cache_unchanged(cache: Path, before: Dict[str, tuple]) -> None:
    """Everything that was in the cache still is, unchanged; new are only top-level lock files."""
    after = snapshot(cache)
    changed = {k for k in before if after.get(k) != before[k]}
    assert not changed, f"changed or removed in the cache: {sorted(changed)}"
    new = sorted(set(after) - set(before))
    for k in new:
        assert "/" not in k and k.endswith(".lock") and after[k][0] == stat.S_IFREG, \
            f"the cache holds {k!r} after a failure (new: {new})"


def error_class(name: str):
    return getattr(errors, name)


# --------------------------------------------------------------------------
# round trips

FORMATS = {"ustar": tarfile.USTAR_FORMAT, "gnu": tarfile.GNU_FORMAT, "pax": tarfile.PAX_FORMAT}
ALL_CHARS = st.characters(blacklist_characters="/\x00", blacklist_categories=("Cs",))
LETTERS = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789-_.é中"


def _component(long_names: bool):
    short = st.text(ALL_CHARS, min_size=1, max_size=12 if not long_names else 30)
    strat = short
    if long_names:
        # 100-255 bytes: names tar can only hold through pax or GNU long names.
        strat = short | st.text(st.sampled_from(LETTERS), min_size=100, max_size=120)
    return strat.filter(lambda s: s not in (".", "..") and len(s.encode("utf8")) <= 255)


@st.composite
def trees(draw, fmt: str):
    """A tree as {relative path: bytes | None (directory)}: parents listed before children."""
    long_names = fmt != "ustar"
    max_depth = 2 if fmt == "ustar" else 6  # ustar: prefix (155) + name (100) must fit
    comp = _component(long_names)
    tree: Dict[str, Optional[bytes]] = {}
    dirs = [()]
    for _ in range(draw(st.integers(1, 14))):
        parent = draw(st.sampled_from(dirs))
        path = parent + (draw(comp),)
        key = "/".join(path)
        if key in tree:
            continue
        if len(path) <= max_depth and draw(st.booleans()):
            tree[key] = None
            dirs.append(path)
        else:
            tree[key] = draw(st.binary(max_size=3000) | st.just(b""))
    return tree


def pack(tree: Dict[str, Optional[bytes]], fmt: str, dot_prefix: bool) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=FORMATS[fmt], encoding="utf-8") as tar:
        if dot_prefix:
            info = tarfile.TarInfo(".")
            info.type, info.mode = tarfile.DIRTYPE, 0o755
            tar.addfile(info)
        for rel, data in tree.items():
            info = tarfile.TarInfo(("./" if dot_prefix else "") + rel)
            info.mtime = 1_700_000_000
            if data is None:
                info.type, info.mode = tarfile.DIRTYPE, 0o755
                tar.addfile(info)
            else:
                info.size, info.mode = len(data), 0o644
                tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def _split(data: bytes, parts: int, seed: int):
    rnd = random.Random(seed)
    cuts = sorted(rnd.sample(range(1, len(data)), parts - 1)) if len(data) > parts else []
    bounds = [0] + cuts + [len(data)]
    return [data[a:b] for a, b in zip(bounds, bounds[1:])]


def compress(data: bytes, how: str, seed: int = 0):
    """Returns (archive bytes, compression name, units or None)."""
    import zstandard

    if how == "none":
        return data, "none", None
    if how == "gz":
        return gzip.compress(data, mtime=0), "gzip", 1
    if how == "gz-multi":
        parts = _split(data, 3, seed)
        return b"".join(gzip.compress(p, compresslevel=1 + i % 9) for i, p in enumerate(parts)), "gzip", len(parts)
    if how == "bz2":
        return bz2.compress(data), "bzip2", None
    if how == "xz":
        return lzma.compress(data, format=lzma.FORMAT_XZ), "xz", None
    if how == "zst":
        return zstandard.ZstdCompressor(level=3, write_checksum=True).compress(data), "zstd", 1
    if how == "zst-multi":
        parts = _split(data, 4, seed)
        cctx = zstandard.ZstdCompressor(level=1, write_checksum=True)
        return b"".join(cctx.compress(p) for p in parts), "zstd", len(parts)
    raise ValueError(how)


@pytest.mark.parametrize("how", ["none", "gz", "gz-multi", "bz2", "xz", "zst", "zst-multi"])
@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data())
def test_round_trip(how, data):
    fmt = data.draw(st.sampled_from(sorted(FORMATS)), label="format")
    tree = data.draw(trees(fmt), label="tree")
    dot_prefix = data.draw(st.booleans(), label="dot_prefix")
    seed = data.draw(st.integers(0, 2**16), label="seed")
    archive, compression, units = compress(pack(tree, fmt, dot_prefix), how, seed)
    with tempfile.TemporaryDirectory() as tmp:
        src = Path(tmp, "archive.tar")
        src.write_bytes(archive)
        target = Path(tmp, "target")
        target.mkdir()
        stats = _core.extract(str(target), path=str(src))
        assert read_tree(target) == tree
    files = [v for v in tree.values() if v is not None]
    assert stats["compression"] == compression
    assert stats["files"] == len(files)
    assert stats["bytes_out"] == sum(map(len, files))
    assert stats["bytes_in"] == len(archive)
    if units is not None:
        assert stats["units"] == units


def _big_pieces(total: int, block: bytes):
    """Pieces of one file of `total` bytes made of `block` repeated (the tail cut)."""
    full, tail = divmod(total, len(block))
    return [block] * full + ([block[:tail]] if tail else [])


def _mixed_block(seed: int, size: int = MiB) -> bytes:
    """Some random bytes and some compressible text: deflate finds matches and literals."""
    rnd = random.Random(seed)
    return rnd.randbytes(size // 4) + make_hostile._text(size - size // 4, seed)


@pytest.fixture(scope="module")
def big_targz(tmp_path_factory):
    """A .tar.gz with one 80 MiB + 12345 byte file (past 64 MiB) and two small ones."""
    d = tmp_path_factory.mktemp("big")
    size = 80 * MiB + 12345
    pieces = _big_pieces(size, _mixed_block(11))
    h = hashlib.sha256()
    for p in pieces:
        h.update(p)
    small = b"saved model bytes" * 100
    data = [make_hostile.header("./", 0, b"5"), make_hostile.header("./variables/", 0, b"5"),
            make_hostile.member("./saved_model.pb", small),
            make_hostile.header("./variables/variables.data-00000-of-00001", size)] + pieces + [
        bytes(-size % 512), make_hostile.member("./variables/variables.index", b"idx"), make_hostile.END]
    path = d / "big.tar.gz"
    path.write_bytes(make_hostile.gzip_from_pieces(data, level=1))
    expected = {"saved_model.pb": hashlib.sha256(small).hexdigest(),
                "variables/variables.data-00000-of-00001": h.hexdigest(),
                "variables/variables.index": hashlib.sha256(b"idx").hexdigest()}
    return path, expected


def _digests(root: Path) -> Dict[str, str]:
    out = {}
    for p in root.rglob("*"):
        if p.is_file():
            h = hashlib.sha256()
            with open(p, "rb") as f:
                while chunk := f.read(4 * MiB):
                    h.update(chunk)
            out[str(p.relative_to(root))] = h.hexdigest()
    return out


def test_big_file_isal_and_zlib_agree(big_targz, tmp_path):
    path, expected = big_targz
    trees_ = {}
    for use_isal in (True, False):
        target = tmp_path / ("isal" if use_isal else "zlib")
        target.mkdir()
        stats = _core.extract(str(target), path=str(path), use_isal=use_isal)
        assert stats["compression"] == "gzip" and stats["files"] == 3
        assert stats["bytes_out"] > 80 * MiB
        assert sorted(p.name for p in target.iterdir()) == ["saved_model.pb", "variables"]
        trees_[use_isal] = _digests(target)
    assert trees_[True] == expected
    assert trees_[False] == expected
    for use_isal in (True, False):
        shutil.rmtree(tmp_path / ("isal" if use_isal else "zlib"))


@functools.lru_cache(maxsize=1)
def _text_3mib() -> bytes:
    return make_hostile._text(3 * MiB, 3)


@pytest.mark.parametrize("use_isal", [True, False], ids=["isal", "zlib"])
@pytest.mark.parametrize("delta", [-9, -8, -5, -4, -1, 0, 1, 2, 10])
def test_gzip_member_boundary_at_read_chunk(tmp_path, use_isal, delta):
    """Two gzip members, the first ending `delta` bytes from the 1 MiB read boundary
    (so its 8-byte trailer, or the next header, straddles two reads)."""
    blob = _text_3mib()
    tar_ = make_hostile.tar(make_hostile.member("a.bin", blob), make_hostile.member("b.txt", b"b"))
    split = MiB - 4096
    raw = zlib.compressobj(0, zlib.DEFLATED, -15)  # stored blocks: sizes are exact
    deflated = raw.compress(tar_[:split]) + raw.flush()
    fixed = 10 + 1 + len(deflated) + 8  # header, the name's NUL, data, trailer
    name_len = MiB + delta - fixed
    assert name_len > 0
    first = (b"\x1f\x8b\x08\x08\x00\x00\x00\x00\x00\x03" + b"n" * name_len + b"\x00" + deflated +
             struct.pack("<II", zlib.crc32(tar_[:split]), split))
    assert len(first) == MiB + delta
    archive = first + gzip.compress(tar_[split:], mtime=0)
    src = tmp_path / "two.tar.gz"
    src.write_bytes(archive)
    target = tmp_path / "t"
    target.mkdir()
    stats = _core.extract(str(target), path=str(src), use_isal=use_isal)
    assert stats["units"] == 2
    assert (target / "a.bin").read_bytes() == blob
    assert (target / "b.txt").read_bytes() == b"b"


def test_bzip2_streams_across_reads(tmp_path):
    """Concatenated bzip2 streams of ~1.9 MB each: stream ends fall inside 1 MiB reads."""
    chunk = _mixed_block(5, 3 * MiB)
    body = bz2.compress(chunk, 9)
    n = 3
    archive = tmp_path / "multi.tar.bz2"
    archive.write_bytes(bz2.compress(make_hostile.header("data.bin", n * len(chunk))) + body * n +
                        bz2.compress(make_hostile.END))
    target = tmp_path / "t"
    target.mkdir()
    stats = _core.extract(str(target), path=str(archive))
    assert stats["compression"] == "bzip2" and stats["bytes_out"] == n * len(chunk)
    assert _digests(target) == {"data.bin": hashlib.sha256(chunk * n).hexdigest()}


def test_many_directories_interleaved_and_duplicates(tmp_path):
    """Files spread over 300 directories in shuffled order (more than the writer keeps
    open), and members repeated: the last copy wins, shorter ones truncate, as with tar."""
    rnd = random.Random(9)
    expected: Dict[str, Optional[bytes]] = {}
    members = []
    for i in range(300):
        d = f"dir{i % 30:02d}/sub{i:03d}"
        expected[d.split("/")[0]] = None
        expected[d] = None
        members.append(make_hostile.directory(d))
    for i in range(1200):
        k = rnd.randrange(300)  # sub<k> lives under dir<k % 30>
        parent = f"dir{k % 30:02d}/sub{k:03d}"
        data = rnd.randbytes(rnd.choice([0, 1, 511, 512, 513, 3000]))
        expected[f"{parent}/f{i % 700}"] = data
        members.append(make_hostile.member(f"{parent}/f{i % 700}", data))
    members.append(make_hostile.member("dup", b"a much longer first version"))
    members.append(make_hostile.member("dup", b"short"))
    expected["dup"] = b"short"
    archive = tmp_path / "many.tar.gz"
    archive.write_bytes(gzip.compress(make_hostile.tar(*members), compresslevel=1))
    target = tmp_path / "t"
    target.mkdir()
    _core.extract(str(target), path=str(archive))
    assert read_tree(target) == expected


# --------------------------------------------------------------------------
# integrity

def test_sha256_checked(tmp_path):
    archive = tmp_path / "m.tar.gz"
    archive.write_bytes(gzip.compress(make_hostile.tar(make_hostile.member("f", b"data"))))
    digest = hashlib.sha256(archive.read_bytes()).hexdigest()
    (tmp_path / "ok").mkdir()
    stats = _core.extract(str(tmp_path / "ok"), path=str(archive), sha256=digest)
    assert stats["sha256"] == digest
    (tmp_path / "bad").mkdir()
    wrong = digest[:-1] + ("0" if digest[-1] != "0" else "1")
    with pytest.raises(errors.IntegrityError, match="sha256"):
        _core.extract(str(tmp_path / "bad"), path=str(archive), sha256=wrong)


INTEGRITY_CASES = [n for n, c in CASES.items() if c.expected == make_hostile.INTEGRITY]


@pytest.fixture(scope="session")
def good_archive(tmp_path_factory) -> Path:
    p = tmp_path_factory.mktemp("good") / "good.tar.gz"
    p.write_bytes(gzip.compress(make_hostile.tar(
        make_hostile.directory("variables"), make_hostile.member("saved_model.pb", b"pb" * 1000),
        make_hostile.member("variables/variables.index", b"index"))))
    return p


@pytest.fixture
def populated_cache(cache_dir, good_archive):
    """The cache holding one good entry; returns its snapshot."""
    entry = Path(hubfast.resolve(str(good_archive)))
    assert (entry / "saved_model.pb").read_bytes() == b"pb" * 1000
    return snapshot(cache_dir)


@pytest.mark.parametrize("name", [_param(n) for n in INTEGRITY_CASES])
def test_corrupt_archive_leaves_cache_unchanged(name, hostile_dir, cache_dir, populated_cache, monkeypatch):
    case = CASES[name]
    if "max_total_bytes" in case.limits:
        monkeypatch.setenv("HUBFAST_MAX_EXTRACT_BYTES", str(case.limits["max_total_bytes"]))
    with pytest.raises(errors.IntegrityError) as ei:
        hubfast.resolve(str(hostile_dir / case.filename))
    assert type(ei.value) is errors.IntegrityError, repr(ei.value)
    assert_cache_unchanged(cache_dir, populated_cache)


# --------------------------------------------------------------------------
# hostile archives

@pytest.fixture(scope="session")
def hostile_dir(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("hostile")
    built = make_hostile.build_all(d)
    assert len(built) >= 40
    return d


def _hostile_params():
    out = []
    for name, case in CASES.items():
        if case.filename.endswith(".gz"):
            out.append(_param(name, True, id_suffix="-isal"))
            out.append(_param(name, False, id_suffix="-zlib"))
        else:
            out.append(_param(name, True))
    return out


def _check_success(case, root: Path) -> None:
    files = {str(p.relative_to(root)) for p in root.rglob("*") if p.is_file() or p.is_symlink()}
    assert files == {k for k, v in case.expect_files.items() if v is not None}
    for rel, data in case.expect_files.items():
        p = root / rel
        if data is None:
            assert p.is_dir() and not p.is_symlink(), rel
        else:
            assert p.is_file() and not p.is_symlink(), rel
            assert p.read_bytes() == data, rel


@pytest.mark.parametrize("name,use_isal", _hostile_params())
def test_hostile_extract(name, use_isal, hostile_dir, tmp_path):
    case = CASES[name]
    target = tmp_path / "a" / "target"
    target.mkdir(parents=True)
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "sentinel.txt").write_text("sentinel")
    before = snapshot(tmp_path, exclude=[target])
    fixtures_before = snapshot(hostile_dir)

    archive = str(hostile_dir / case.filename)
    if case.expected is None:
        _core.extract(str(target), path=archive, limits=case.limits, use_isal=use_isal)
        _check_success(case, target)
    else:
        cls = error_class(case.expected)
        with pytest.raises(cls) as ei:
            _core.extract(str(target), path=archive, limits=case.limits, use_isal=use_isal)
        assert type(ei.value) is cls, f"{case.description}: {ei.value!r}"

    assert snapshot(tmp_path, exclude=[target]) == before, "something was written outside the target"
    assert snapshot(hostile_dir) == fixtures_before
    assert_plain_tree(target)
    for p in case.forbidden:
        assert not os.path.lexists(p), p


@pytest.mark.parametrize("name", [_param(n) for n, c in CASES.items()
                                  if c.expected != make_hostile.INTEGRITY])
def test_hostile_resolve(name, hostile_dir, tmp_path, cache_dir, populated_cache, monkeypatch):
    case = CASES[name]
    if "max_total_bytes" in case.limits:
        monkeypatch.setenv("HUBFAST_MAX_EXTRACT_BYTES", str(case.limits["max_total_bytes"]))
    if "max_members" in case.limits:
        monkeypatch.setenv("HUBFAST_MAX_MEMBERS", str(case.limits["max_members"]))
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "sentinel.txt").write_text("sentinel")
    before = snapshot(tmp_path, exclude=[cache_dir])

    handle = str(hostile_dir / case.filename)
    if case.expected is None:
        path = Path(hubfast.resolve(handle))
        assert path.parent == cache_dir
        _check_success(case, path)
        assert_plain_tree(path)
    else:
        cls = error_class(case.expected)
        with pytest.raises(cls) as ei:
            hubfast.resolve(handle)
        assert type(ei.value) is cls, f"{case.description}: {ei.value!r}"
        assert_cache_unchanged(cache_dir, populated_cache)
    assert snapshot(tmp_path, exclude=[cache_dir]) == before
    for p in case.forbidden:
        assert not os.path.lexists(p), p


@pytest.mark.parametrize("link,points_to,member_name", [
    ("lnk", "OUT", "lnk/pwned"),                          # a directory link on the way
    ("lnk", "OUT/new", "lnk"),                            # a dangling link in place of the file
    ("lnk", "OUT/sentinel.txt", "lnk"),                   # a link to an existing file
    ("d/lnk", "../../outside", "d/lnk/pwned"),            # a relative link one level down
], ids=["through-dir-link", "onto-dangling-link", "onto-file-link", "nested-dir-link"])
def test_links_already_in_target_are_not_followed(tmp_path, link, points_to, member_name):
    """Links found on disk are never followed (the writer resolves beneath the target fd)."""
    target = tmp_path / "target"
    (target / "d").mkdir(parents=True)
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "sentinel.txt").write_text("sentinel")
    (target / link).symlink_to(points_to.replace("OUT", str(outside)))
    archive = tmp_path / "a.tar"
    archive.write_bytes(make_hostile.tar(make_hostile.member(member_name, b"pwned")))
    before = snapshot(outside)
    with pytest.raises(errors.UnsafeArchiveError):
        _core.extract(str(target), path=str(archive))
    assert snapshot(outside) == before
    assert (target / link).is_symlink()


# --------------------------------------------------------------------------
# Ctrl-C

@pytest.fixture(scope="module")
def slow_tarbz2(tmp_path_factory) -> Path:
    """A .tar.bz2 whose 180 MiB take ~6 s to decode here: one 3 MiB stream
    compressed once and repeated (concatenated bzip2 streams are one archive)."""
    d = tmp_path_factory.mktemp("slow")
    chunk = _mixed_block(5, 3 * MiB)
    n = 60
    body = bz2.compress(chunk, 9)
    with open(d / "slow.tar.bz2", "wb") as f:
        f.write(bz2.compress(make_hostile.header("variables.data", n * len(chunk))))
        for _ in range(n):
            f.write(body)
        f.write(bz2.compress(make_hostile.END))
    return d / "slow.tar.bz2"


def test_ctrl_c_stops_extraction_promptly(slow_tarbz2, cache_dir):
    code = textwrap.dedent("""
        import signal, sys, hubfast
        # Ctrl-C as in a terminal, however the suite was started (a background job, a CI
        # runner: SIGINT inherited as ignored).
        signal.signal(signal.SIGINT, signal.default_int_handler)
        print("start", flush=True)
        try:
            hubfast.resolve(sys.argv[1])
        except KeyboardInterrupt:
            print("interrupted", flush=True)
            sys.exit(42)
        print("finished", flush=True)
    """)
    env = dict(os.environ, PYTHONPATH=PYTHONPATH, TFHUB_CACHE_DIR=str(cache_dir))
    proc = subprocess.Popen([sys.executable, "-c", code, str(slow_tarbz2)], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        line = proc.stdout.readline().strip()
        if line != "start":
            proc.kill()
            pytest.fail(f"the worker did not start: {line!r} {proc.communicate()}")
        deadline = time.monotonic() + 20
        while not any(p.name.endswith(".tmp") for p in cache_dir.iterdir()):
            assert proc.poll() is None, proc.communicate()
            assert time.monotonic() < deadline, "extraction never started"
            time.sleep(0.02)
        time.sleep(0.5)
        assert proc.poll() is None, "extraction ended before Ctrl-C"
        sent = time.monotonic()
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=10)
        took = time.monotonic() - sent
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 42 and "interrupted" in out, (out, err)
    assert took < 5, f"exited {took:.2f} s after SIGINT"  # generous: a busy machine
    assert_cache_clean(cache_dir)


# --------------------------------------------------------------------------
# memory

def test_peak_memory_bounded(tmp_path, cache_dir):
    """~512 MiB in one .tar.gz: peak RSS grows by less than 256 MiB."""
    size = 512 * MiB
    block = _mixed_block(21, MiB)
    data = [make_hostile.header("./variables/", 0, b"5"),
            make_hostile.header("./variables/variables.data-00000-of-00001", size)]
    data += _big_pieces(size, block) + [make_hostile.member("./saved_model.pb", b"pb"), make_hostile.END]
    archive = tmp_path / "big512.tar.gz"
    archive.write_bytes(make_hostile.gzip_from_pieces(data, level=1))
    # Linux carries ru_maxrss across exec (a child spawned from this big pytest
    # process starts with pytest's peak), so the measuring process is a fork of
    # the fresh interpreter: its ru_maxrss starts from its own size.
    code = textwrap.dedent("""
        import json, os, resource, sys, hubfast
        pid = os.fork()
        if pid == 0:
            code = 1
            try:
                before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
                path = hubfast.resolve(sys.argv[1])
                after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
                print(json.dumps({"before": before, "after": after, "path": path,
                                  "stats": hubfast.last_stats()}), flush=True)
                code = 0
            except BaseException:
                import traceback
                traceback.print_exc()
            finally:
                sys.stderr.flush()
                os._exit(code)
        _, status = os.waitpid(pid, 0)
        sys.exit(os.waitstatus_to_exitcode(status))
    """)
    env = dict(os.environ, PYTHONPATH=PYTHONPATH, TFHUB_CACHE_DIR=str(cache_dir))
    res = subprocess.run([sys.executable, "-c", code, str(archive)], env=env, capture_output=True,
                         text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    r = json.loads(res.stdout)
    assert r["stats"]["bytes_out"] == size + 2
    assert os.path.getsize(Path(r["path"], "variables", "variables.data-00000-of-00001")) == size
    assert r["before"] < 200 * 1024, f"baseline RSS {r['before']} KiB: the measurement is meaningless"
    grew_mib = (r["after"] - r["before"]) / 1024
    assert grew_mib < 256, f"peak RSS grew by {grew_mib:.0f} MiB"
    shutil.rmtree(r["path"])  # pytest keeps the last runs' tmp dirs: don't hoard 700 MB
    archive.unlink()
