"""Throwaway TLS material for tests, made with the ``openssl`` command at test time: a CA,
certificates it signs (for 127.0.0.1 and localhost, usable by servers and clients),
and a second, unrelated CA to play an outsider."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import attrs
import pytest

from replication.tls import TlsFiles

__all__ = ["Pki", "make_pki"]

_KEY = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes"]
_LEAF_EXTENSIONS = (
    "basicConstraints=CA:FALSE\n"
    "keyUsage=critical,digitalSignature\n"
    "extendedKeyUsage=serverAuth,clientAuth\n"
    "subjectAltName=IP:127.0.0.1,DNS:localhost\n"
)


def _openssl(*args: str) -> None:
    done = subprocess.run(
        ["openssl", *args], capture_output=True, text=True, timeout=30, check=False
    )
    assert done.returncode == 0, f"openssl {' '.join(args)} failed:\n{done.stderr}"


def _make_ca(directory: Path, name: str) -> tuple[Path, Path]:
    cert, key = directory / f"{name}.pem", directory / f"{name}.key"
    _openssl(
        "req", "-x509", *_KEY, "-keyout", str(key), "-out", str(cert), "-days", "2",
        "-subj", f"/CN={name}", "-addext", "basicConstraints=critical,CA:TRUE",
        "-addext", "keyUsage=critical,keyCertSign,cRLSign",
    )  # fmt: skip
    return cert, key


def _make_leaf(directory: Path, name: str, ca: tuple[Path, Path]) -> tuple[Path, Path]:
    cert, key, request = (directory / f"{name}{ext}" for ext in (".pem", ".key", ".csr"))
    extensions = directory / f"{name}.ext"
    extensions.write_text(_LEAF_EXTENSIONS)
    _openssl("req", *_KEY, "-keyout", str(key), "-out", str(request), "-subj", f"/CN={name}")
    _openssl(
        "x509", "-req", "-in", str(request), "-CA", str(ca[0]), "-CAkey", str(ca[1]),
        "-CAcreateserial", "-out", str(cert), "-days", "2", "-extfile", str(extensions),
    )  # fmt: skip
    return cert, key


@attrs.frozen
class Pki:
    """Paths of the test CA and of certificates for named ends."""

    directory: Path
    ca_file: Path
    outsider_ca_file: Path
    ends: dict[str, tuple[Path, Path]]
    """Name -> (certificate, key); names starting with ``outsider`` are signed by the
    outsider CA, all others by :attr:`ca_file`."""

    def files(self, name: str) -> TlsFiles:
        """The end's certificate and key, and the cluster's CA to verify peers with."""
        cert, key = self.ends[name]
        return TlsFiles(cert_file=str(cert), key_file=str(key), ca_file=str(self.ca_file))


def make_pki(directory: Path, names: tuple[str, ...]) -> Pki:
    if shutil.which("openssl") is None:
        pytest.fail("the TLS tests make their certificates with the openssl command: install it")
    directory.mkdir(parents=True, exist_ok=True)
    ca = _make_ca(directory, "cluster-ca")
    outsider = _make_ca(directory, "outsider-ca")
    ends = {
        name: _make_leaf(directory, name, outsider if name.startswith("outsider") else ca)
        for name in names
    }
    return Pki(directory, ca[0], outsider[0], ends)
