"""HTTP errors behave as urllib's HTTPError (code, reason, headers, url) and print
their message when nothing catches them, in a real process against the loopback server."""
from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

import hubfast

PYTHONPATH = str(Path(hubfast.__file__).resolve().parents[1])


@pytest.mark.parametrize("status,cls", [(404, "HTTPNotFoundError"), (403, "HTTPAccessDeniedError"),
                                        (401, "HTTPAccessDeniedError"), (400, "HTTPStatusError")])
def test_uncaught_http_error_prints_its_message(tmp_path, status, cls):
    code = textwrap.dedent(f"""
        import urllib.error
        import hubfast
        from hubfast.server import TFHubServer
        from hubfast.testing.faults import Fault
        srv = TFHubServer().start()
        url = srv.url + "/some/model/1"
        srv.inject("/some/model/1", Fault.status({status}), times=100)
        try:
            hubfast.resolve(url)
        except urllib.error.HTTPError as e:
            assert e.code == {status} and e.getcode() == {status}, e.code
            assert isinstance(e.reason, str) and url in str(e)
            assert e.headers is not None and e.headers.get("x-none") is None
            assert e.read() == b""
            assert not hasattr(e, "no_such_attribute")
            caught = e
        raise caught
    """)
    env = dict(os.environ, TFHUB_CACHE_DIR=str(tmp_path / "c"), PYTHONPATH=PYTHONPATH,
               HUBFAST_MAX_RETRIES="0")
    p = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                       timeout=120)
    assert p.returncode == 1, p.stderr
    last = p.stderr.strip().splitlines()[-1]
    assert last.startswith(f"hubfast.errors.{cls}: "), p.stderr
    assert "/some/model/1" in last
    assert "lost sys.stderr" not in p.stderr and "KeyError" not in p.stderr, p.stderr
