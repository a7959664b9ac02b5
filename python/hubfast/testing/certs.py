"""TLS certificates for tests: a throwaway CA and a server certificate signed by it."""
from __future__ import annotations

import ipaddress
import os
import subprocess
from typing import Tuple, Union

__all__ = ["make_self_signed_cert"]

def _openssl(*args: str, cwd: str) -> None:
    subprocess.run(
        ["openssl", *args],
        cwd=cwd,
        check=True,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        timeout=60,
    )


def make_self_signed_cert(
    dirpath: Union[str, "os.PathLike[str]"], hostname: str = "127.0.0.1"
) -> Tuple[str, str, str]:
    """Create a test CA and a server certificate signed by it, with the ``openssl`` tool.

    The server certificate's subjectAltName holds IP:127.0.0.1, IP:::1, DNS:localhost and
    ``hostname``. Returns ``(ca_cert_path, cert_path, key_path)`` (PEM files in ``dirpath``).
    Keys are P-256 (fast to generate); extensions satisfy ``VERIFY_X509_STRICT``.
    """
    d = os.fspath(dirpath)
    os.makedirs(d, exist_ok=True)
    ca_key, ca_cert = "ca.key", "ca.pem"
    key, csr, cert = "server.key", "server.csr", "server.pem"
    sans = ["IP:127.0.0.1", "IP:::1", "DNS:localhost"]
    try:
        ipaddress.ip_address(hostname)
        extra = "IP:" + hostname
    except ValueError:
        extra = "DNS:" + hostname
    if extra not in sans:
        sans.append(extra)
    ec = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"]
    _openssl(
        "req", "-x509", *ec, "-keyout", ca_key, "-out", ca_cert, "-days", "3650", "-sha256",
        "-subj", "/CN=hubfast test CA",
        "-addext", "basicConstraints=critical,CA:TRUE",
        "-addext", "keyUsage=critical,keyCertSign,cRLSign",
        "-addext", "subjectKeyIdentifier=hash",
        cwd=d,
    )  # fmt: skip
    _openssl("req", "-new", *ec, "-keyout", key, "-out", csr, "-subj", f"/CN={hostname}", cwd=d)
    with open(os.path.join(d, "server.ext"), "w") as f:
        f.write(
            "basicConstraints=critical,CA:FALSE\n"
            "keyUsage=critical,digitalSignature,keyEncipherment\n"
            "extendedKeyUsage=serverAuth\n"
            "subjectKeyIdentifier=hash\n"
            "authorityKeyIdentifier=keyid,issuer\n"
            f"subjectAltName={','.join(sans)}\n"
        )
    serial = "0x" + os.urandom(8).hex()
    _openssl(
        "x509", "-req", "-in", csr, "-CA", ca_cert, "-CAkey", ca_key, "-set_serial", serial,
        "-out", cert, "-days", "3650", "-sha256", "-extfile", "server.ext",
        cwd=d,
    )  # fmt: skip
    return os.path.join(d, ca_cert), os.path.join(d, cert), os.path.join(d, key)
