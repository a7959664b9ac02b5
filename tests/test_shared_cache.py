"""The cache root is shared ground: another local user may create it, plant links
for the names hubfast creates, or plant entries. These tests run as root with a real
unprivileged user they create (`useradd`); the neighbour's steps run under its uid.

/root is 0700, so every child imports hubfast first and only then drops privileges."""
from __future__ import annotations

import json
import os
import pwd
import shutil
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

import pytest

import hubfast
from hubfast import resolvers

PYTHONPATH = str(Path(hubfast.__file__).resolve().parents[1])
NEIGHBOUR = "hfneighbour"

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="needs root to create a user")


@pytest.fixture(scope="module")
def neighbour() -> pwd.struct_passwd:
    """A real unprivileged user (created once; left for later runs)."""
    try:
        return pwd.getpwnam(NEIGHBOUR)
    except KeyError:
        pass
    r = subprocess.run(["useradd", "--system", "--user-group", "--no-create-home",
                        "--shell", "/usr/sbin/nologin", NEIGHBOUR], capture_output=True, text=True)
    if r.returncode not in (0, 9):  # 9: created meanwhile by a parallel run
        pytest.skip(f"useradd failed: {r.stderr.strip()}")
    return pwd.getpwnam(NEIGHBOUR)


@pytest.fixture
def shared(tmp_path) -> Path:
    """A sticky world-writable directory, as /tmp is (pytest's tmp dirs are 0700)."""
    d = Path(tempfile.mkdtemp(prefix="hubfast-shared-"))
    os.chmod(d, 0o1777)
    yield d
    shutil.rmtree(d, ignore_errors=True)


def as_user(user: pwd.struct_passwd, fn) -> None:
    """Runs `fn()` in a forked child under `user`'s uid (the interpreter lives under
    /root, which the user cannot enter, so no new interpreter is started)."""
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child
        code = 1
        try:
            os.setgroups([])
            os.setgid(user.pw_gid)
            os.setuid(user.pw_uid)
            fn()
            code = 0
        except BaseException:
            import traceback
            traceback.print_exc()
        finally:
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0, "the neighbour's step failed"


def _mkdir_shared(user: pwd.struct_passwd, path: Path) -> None:
    def make() -> None:
        os.mkdir(path)
        os.chmod(path, 0o777)
    as_user(user, make)


def _archive(where: Path) -> Path:
    src = where / "src"
    (src / "variables").mkdir(parents=True)
    (src / "saved_model.pb").write_bytes(b"pb" * 100)
    (src / "variables" / "variables.index").write_bytes(b"i" * 10)
    out = where / "m.tar.gz"
    with tarfile.open(out, "w:gz") as tar:
        tar.add(src, arcname=".")
    os.chmod(out, 0o644)
    return out


# The victim's child: prints its pid, waits for the neighbour to plant, then works.
ROOT_CHILD = """
import json, sys
import hubfast
from hubfast import resolvers
print(__import__("os").getpid(), flush=True)
sys.stdin.readline()
try:
    entry = resolvers.resolve_entry(sys.argv[1])
    with entry.in_use() as path:
        pass
    print(json.dumps({"ok": True, "path": path}))
except Exception as e:
    print(json.dumps({"ok": False, "type": type(e).__name__, "msg": str(e),
                      "perm": isinstance(e, PermissionError)}))
"""


def _root_fetch_with_plants(archive: Path, cache: Path, plant) -> dict:
    env = dict(os.environ, TFHUB_CACHE_DIR=str(cache), PYTHONPATH=PYTHONPATH,
               HUBFAST_TRUSTED_GROUP="any")  # a team cache: the neighbour may write the root
    child = subprocess.Popen([sys.executable, "-c", ROOT_CHILD, str(archive)], env=env,
                             stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                             text=True)
    try:
        pid = int(child.stdout.readline())
        plant(pid)
        out, err = child.communicate("go\n", timeout=60)
    finally:
        child.kill()
    assert child.returncode == 0, err
    return json.loads(out.strip().splitlines()[-1])


def _plant(neighbour, cache: Path, links: dict) -> None:
    def plant() -> None:
        for name, target in links.items():
            os.symlink(target, cache / name)
    as_user(neighbour, plant)


def test_predictable_names_are_not_written_through(neighbour, shared):
    """The neighbour owns the root and links every name root's fetch could predict to
    a file of root's: the fetch succeeds and the file is untouched."""
    archive = _archive(shared)
    victim = shared / "victim"
    victim.write_text("precious\n")
    cache = shared / "cache"
    _mkdir_shared(neighbour, cache)
    name = resolvers.describe(str(archive))["entry_name"]

    def plant(pid: int) -> None:
        links = {}
        for base in (f"{name}.hubfast", f"{name}.descriptor.txt"):
            links[f"{base}.tmp{pid}"] = str(victim)  # the temp names hubfast once used
        _plant(neighbour, cache, links)

    out = _root_fetch_with_plants(archive, cache, plant)
    assert out["ok"], out
    assert victim.read_text() == "precious\n"
    assert (Path(out["path"]) / "saved_model.pb").read_bytes() == b"pb" * 100
    # What hubfast wrote are regular files of its own, not links.
    for n in (f"{name}.hubfast", f"{name}.descriptor.txt"):
        assert (cache / n).is_file() and not (cache / n).is_symlink()


@pytest.mark.parametrize("which", ["hubfast.lock", "hubfast.use"])
def test_lock_files_are_not_created_through_links(neighbour, shared, which):
    """A link planted for a lock file makes the fetch (or load) fail with
    UnsafeCacheError; nothing is created where the link points (e.g. /etc/nologin)."""
    archive = _archive(shared)
    cache = shared / "cache"
    _mkdir_shared(neighbour, cache)
    name = resolvers.describe(str(archive))["entry_name"]
    target = shared / "nologin"
    if which == "hubfast.use":  # the entry exists; the link waits for the reader
        env = dict(os.environ, TFHUB_CACHE_DIR=str(cache), PYTHONPATH=PYTHONPATH,
                   HUBFAST_TRUSTED_GROUP="any")
        subprocess.run([sys.executable, "-m", "hubfast", "fetch", str(archive)], env=env,
                       check=True, capture_output=True)
        (cache / f"{name}.hubfast.use").unlink(missing_ok=True)
    out = _root_fetch_with_plants(
        archive, cache, lambda pid: _plant(neighbour, cache, {f"{name}.{which}": str(target)}))
    assert not out["ok"] and out["type"] == "UnsafeCacheError" and out["perm"], out
    assert f"{name}.{which}" in out["msg"]
    assert not target.exists()


@pytest.mark.parametrize("verb", ["rm", "prune"])
def test_rm_and_prune_leave_a_shared_root_as_it_was(neighbour, shared, verb):
    """A shared 1777 root (a team cache) stays 1777, and a link the neighbour planted
    among an entry's leftovers is never followed: what it points to survives."""
    archive = _archive(shared)
    cache = shared / "cache"
    cache.mkdir()
    os.chmod(cache, 0o1777)
    env = dict(os.environ, TFHUB_CACHE_DIR=str(cache), PYTHONPATH=PYTHONPATH,
               HUBFAST_TRUSTED_GROUP="any")
    subprocess.run([sys.executable, "-m", "hubfast", "fetch", str(archive)], env=env, check=True,
                   capture_output=True)
    name = resolvers.describe(str(archive))["entry_name"]
    theirs = shared / "theirs"

    def plant() -> None:
        theirs.mkdir()
        (theirs / "keep").write_text("mine\n")
        os.chmod(theirs, 0o755)
        os.symlink(theirs, cache / f"{name}.hf{'0' * 30}.old")
    as_user(neighbour, plant)

    args = ["rm", str(archive)] if verb == "rm" else ["prune", "--max-size", "0"]
    p = subprocess.run([sys.executable, "-m", "hubfast", *args], env=env, capture_output=True,
                       text=True, timeout=60)
    assert p.returncode == 0, p.stderr
    assert oct(cache.stat().st_mode & 0o7777) == oct(0o1777)
    assert (theirs / "keep").read_text() == "mine\n"
    assert oct(theirs.stat().st_mode & 0o7777) == oct(0o755)
    assert not (cache / name).exists()


# --------------------------------------------------------------------------- planted roots

RESOLVE = """
import json, os, sys
import hubfast
from hubfast import resolvers
uid = int(os.environ.pop("AS_UID", "0"))
if uid:
    import pwd
    pw = pwd.getpwuid(uid)
    os.setgroups([]); os.setgid(pw.pw_gid); os.setuid(uid)
try:
    path = hubfast.resolve(sys.argv[1])
    print(json.dumps({"ok": True, "path": path,
                      "pb": open(os.path.join(path, "saved_model.pb"), "rb").read().decode()}))
except Exception as e:
    print(json.dumps({"ok": False, "type": type(e).__name__, "msg": str(e),
                      "perm": isinstance(e, PermissionError)}))
"""


def _resolve(handle: str, as_uid: int = 0, **env: str) -> dict:
    full = dict(os.environ, PYTHONPATH=PYTHONPATH, AS_UID=str(as_uid), **env)
    for k in ("HUBFAST_TRUSTED_GROUP", "HUBFAST_CACHE_LAYERS", "HUBFAST_OFFLINE"):
        if k not in env:
            full.pop(k, None)
    p = subprocess.run([sys.executable, "-c", RESOLVE, handle], env=full, capture_output=True,
                       text=True, timeout=60)
    assert p.returncode == 0, p.stderr
    return json.loads(p.stdout.strip().splitlines()[-1])


def _plant_entry(neighbour, cache: Path, name: str) -> None:
    """The neighbour makes the root (as `mkdir` would, 0755) and plants a model in it."""
    def plant() -> None:
        cache.mkdir()
        (cache / name).mkdir()
        (cache / name / "saved_model.pb").write_text("evil")
    as_user(neighbour, plant)


def test_a_root_planted_by_another_user_is_refused(neighbour, shared):
    archive = _archive(shared)
    cache = shared / "cache"
    _plant_entry(neighbour, cache, resolvers.describe(str(archive))["entry_name"])
    out = _resolve(str(archive), TFHUB_CACHE_DIR=str(cache))
    assert not out["ok"] and out["type"] == "UnsafeCacheError" and out["perm"], out
    for part in (str(cache), NEIGHBOUR, "0o755", "TFHUB_CACHE_DIR", "HUBFAST_TRUSTED_GROUP"):
        assert part in out["msg"], (part, out["msg"])
    # A team cache opts in: then the neighbour's entry is what the team shares.
    out = _resolve(str(archive), TFHUB_CACHE_DIR=str(cache), HUBFAST_TRUSTED_GROUP="any")
    assert out["ok"] and out["pb"] == "evil", out
    out = _resolve(str(archive), TFHUB_CACHE_DIR=str(cache), HUBFAST_TRUSTED_GROUP=NEIGHBOUR)
    assert out["ok"] and out["pb"] == "evil", out


def test_a_planted_entry_in_a_trusted_root_is_refused(neighbour, shared):
    archive = _archive(shared)
    cache = shared / "cache"
    cache.mkdir(mode=0o755)
    name = resolvers.describe(str(archive))["entry_name"]
    (cache / name).mkdir()
    (cache / name / "saved_model.pb").write_text("evil")
    os.chown(cache / name, neighbour.pw_uid, neighbour.pw_gid)
    out = _resolve(str(archive), TFHUB_CACHE_DIR=str(cache))
    assert not out["ok"] and out["type"] == "UnsafeCacheError", out
    assert str(cache / name) in out["msg"] and NEIGHBOUR in out["msg"], out


def test_a_root_that_is_another_users_link_is_refused(neighbour, shared):
    archive = _archive(shared)
    real = shared / "real"
    real.mkdir(mode=0o755)  # root's own directory...
    link = shared / "cache"
    as_user(neighbour, lambda: os.symlink(real, link))  # ...behind the neighbour's link
    out = _resolve(str(archive), TFHUB_CACHE_DIR=str(link))
    assert not out["ok"] and out["type"] == "UnsafeCacheError" and "(a link)" in out["msg"], out
    assert list(real.iterdir()) == []


def test_group_write_of_a_private_group_is_trusted(neighbour, shared):
    """umask 002 (Debian, Ubuntu): the user's own 0775 root, group its private group."""
    archive = _archive(shared)
    cache = shared / "cache"

    def make() -> None:
        cache.mkdir()
        os.chmod(cache, 0o775)
    as_user(neighbour, make)
    assert cache.stat().st_gid == neighbour.pw_gid
    out = _resolve(str(archive), as_uid=neighbour.pw_uid, TFHUB_CACHE_DIR=str(cache))
    assert out["ok"], out


def test_default_root_is_private_and_a_named_root_is_readable(shared):
    archive = _archive(shared)
    out = _resolve(str(archive), TMPDIR=str(shared), TFHUB_CACHE_DIR="")
    assert out["ok"], out
    assert oct((shared / "tfhub_modules").stat().st_mode & 0o777) == oct(0o700)
    out = _resolve(str(archive), TFHUB_CACHE_DIR=str(shared / "named"))
    assert out["ok"], out
    assert oct((shared / "named").stat().st_mode & 0o777) == oct(0o755)


def test_a_read_only_layer_is_trusted_whoever_owns_it(neighbour, shared):
    """NFS root_squash makes a layer's owner `nobody`: on a read-only mount it is trusted."""
    archive = _archive(shared)
    mnt = shared / "layer"
    mnt.mkdir()
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=8m", "tmpfs", str(mnt)],
                       capture_output=True, text=True)
    if r.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {r.stderr.strip()}")
    try:
        layer = mnt / "cache"
        out = _resolve(str(archive), TFHUB_CACHE_DIR=str(layer))
        assert out["ok"], out
        for dirpath, dirnames, filenames in os.walk(mnt):
            for n in dirnames + filenames:
                os.lchown(os.path.join(dirpath, n), neighbour.pw_uid, neighbour.pw_gid)
        os.chmod(layer, 0o777)  # even writable by all: nobody can write a read-only mount
        subprocess.run(["mount", "-o", "remount,ro", str(mnt)], check=True)
        out = _resolve(str(archive), TFHUB_CACHE_DIR=str(shared / "mine"),
                       HUBFAST_CACHE_LAYERS=str(layer), HUBFAST_OFFLINE="1")
        assert out["ok"] and out["path"].startswith(str(layer)), out
    finally:
        subprocess.run(["umount", "-l", str(mnt)])


def test_pack_does_not_write_through_a_planted_partial_file(neighbour, shared):
    """`hubfast pack` into a shared directory: the neighbour links the name the partial
    archive once had (<out>.partial) to a file of root's, which stays untouched."""
    from hubfast import pack

    src = shared / "model"
    src.mkdir()
    (src / "saved_model.pb").write_bytes(b"pb")
    victim = shared / "victim"
    victim.write_text("precious\n")
    out = shared / "out" / "m.tar.gz"
    out.parent.mkdir()
    os.chmod(out.parent, 0o1777)
    as_user(neighbour, lambda: os.symlink(victim, str(out) + ".partial"))
    pack.pack(str(src), str(out))
    assert victim.read_text() == "precious\n"
    assert tarfile.open(out).getnames()


def test_ls_does_not_hang_on_planted_fifos(neighbour, shared):
    """A team cache: FIFOs the neighbour planted for a descriptor and a tensorflow_hub
    lock are skipped, not read (a read would block `hubfast ls` forever)."""
    cache = shared / "cache"
    cache.mkdir()
    os.chmod(cache, 0o1777)
    name = "a" * 40

    def plant() -> None:
        os.mkfifo(cache / f"{name}.descriptor.txt")
        os.mkfifo(cache / f"{name}.lock")
    as_user(neighbour, plant)
    env = dict(os.environ, TFHUB_CACHE_DIR=str(cache), PYTHONPATH=PYTHONPATH,
               HUBFAST_TRUSTED_GROUP="any")
    p = subprocess.run([sys.executable, "-m", "hubfast", "ls", "--json"], env=env,
                       capture_output=True, text=True, timeout=60)
    assert p.returncode == 0, p.stderr
