"""The settings surface: config.py reads every variable, each is documented once, each
default has one source, and the native options reject what they do not know."""
from __future__ import annotations

import re
import tarfile
from pathlib import Path

import pytest

import hubfast
from hubfast import _core, config

REPO = Path(__file__).resolve().parents[1]
PACKAGE = Path(hubfast.__file__).resolve().parent
NAME = re.compile(r"\bHUBFAST_[A-Z0-9_]+")


def _config_names() -> set:
    return {v for k, v in vars(config).items() if k.endswith("_ENV") and v.startswith("HUBFAST_")} \
        | set(config.ENDPOINT_ENVS.values())


def test_every_setting_is_public_or_tuning_once():
    public, tuning = set(config.PUBLIC), set(config.TUNING)
    assert len(public) == len(config.PUBLIC) and len(tuning) == len(config.TUNING)
    assert not public & tuning
    assert public | tuning == _config_names()


def test_only_config_reads_the_environment():
    """No other module of the package reads a HUBFAST_ variable, and the C++ core reads
    none at all: it gets every value through its options."""
    for path in PACKAGE.rglob("*.py"):
        if path.name == "config.py" or "testing" in path.relative_to(PACKAGE).parts:
            continue
        text = path.read_text()
        for m in re.finditer(r"(os\.environ(?:\.get)?|os\.getenv)\s*[\[(]\s*['\"](HUBFAST_\w+)", text):
            pytest.fail(f"{path.name} reads {m.group(2)} itself; read it in config.py")
    for path in [*(REPO / "cpp" / "src").iterdir(), *(REPO / "cpp" / "include").rglob("*.h"),
                 *(REPO / "cpp" / "bindings").iterdir()]:
        assert "getenv" not in path.read_text(), f"{path.name} reads the environment"


def _documented(page: str) -> set:
    rows = [line for line in (REPO / "docs" / page).read_text().splitlines()
            if line.startswith("| `HUBFAST_")]
    return {n for row in rows for n in NAME.findall(row.split("|")[1])}


def test_docs_list_each_setting_on_its_page():
    assert _documented("settings.md") == set(config.PUBLIC)
    assert _documented("settings-tuning.md") >= set(config.TUNING)
    assert not _documented("settings-tuning.md") & set(config.PUBLIC)


def test_native_defaults_agree_with_config(monkeypatch):
    """config.py holds each default; a native option that a setting feeds starts equal
    to it, so a call that leaves the option out behaves as the setting's default."""
    for name in _config_names():
        monkeypatch.delenv(name, raising=False)
    s = config.settings()
    assert _core.native_defaults() == {
        "connections": s.connections, "adaptive_connections": s.adaptive_connections,
        "min_parallel_bytes": s.min_parallel_bytes, "connect_timeout": s.connect_timeout,
        "low_speed_time": s.stall_timeout, "max_retries": s.max_retries,
        "max_total_bytes": s.max_extract_bytes, "max_members": s.max_members,
        "decode_threads": s.decode_threads}


@pytest.fixture
def archive(tmp_path: Path) -> Path:
    (tmp_path / "f.txt").write_text("x")
    path = tmp_path / "a.tar.gz"
    with tarfile.open(path, "w:gz") as tar:
        tar.add(tmp_path / "f.txt", arcname="f.txt")
    return path


@pytest.mark.parametrize("kw", [{"limits": {"max_member": 1}},
                                {"fetch": {"conections": 2}},
                                {"limits": {"decode_threads": 1, "max_totl_bytes": 9}}])
def test_a_misspelt_option_raises(tmp_path, archive, kw):
    out = tmp_path / "out"
    out.mkdir()
    key = next(iter(set(next(iter(kw.values()))) - {"decode_threads"}))
    with pytest.raises(ValueError, match=f"unknown .* option '{key}'"):
        _core.extract(str(out), path=str(archive), **kw)
    assert list(out.iterdir()) == []
    _core.extract(str(out), path=str(archive), limits={"max_members": 1})  # spelt right
    assert (out / "f.txt").read_text() == "x"
