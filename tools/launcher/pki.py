"""A throwaway PKI for a local cluster and the TLS tests, made with the ``openssl``
command: one CA, and one certificate per named end signed by it (usable by a server and
by a client: a node presents it on its client port, on its replication port and when it
dials its master).

Each end's certificate names the end (common name and a DNS subject alternative name, so
``tls_peer_names`` can check that a slave is the node it claims to be), ``localhost``,
and its IP addresses (127.0.0.1 unless told otherwise), which clients and slaves dial.
Ends whose name starts with ``outsider`` are signed by a second, unrelated CA instead:
a test's stranger. Keys are EC P-256 (fast to make), readable by the owner only;
certificates are valid for ``days`` days. Blocking (runs ``openssl``): a trio caller
runs :func:`make_pki` in a thread.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from collections.abc import Mapping, Sequence
from pathlib import Path

import attrs

from replication.tls import TlsFiles

__all__ = ["CA_NAME", "OUTSIDER", "Pki", "PkiError", "make_pki"]

CA_NAME = "ca"
"""The CA's files are ``ca.pem`` (what clients trust) and ``ca.key``."""
OUTSIDER = "outsider"
"""Ends named ``outsider...`` are signed by a second CA, ``outsider-ca.pem``."""
DEFAULT_ADDRESSES = ("127.0.0.1",)
OPENSSL_TIMEOUT_S = 30.0
_KEY = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes"]


class PkiError(RuntimeError):
    """The certificates could not be made: the reason, and what to do."""


@attrs.frozen
class Pki:
    """Where the CA and each end's certificate and key are (PEM files in ``directory``)."""

    directory: Path
    ca_file: Path
    """The CA certificate every end's certificate is signed by (outsiders aside)."""
    outsider_ca_file: Path | None
    """The second CA, when an ``outsider`` end was asked for."""
    ends: Mapping[str, tuple[Path, Path]]
    """Name -> (certificate, key)."""

    def files(self, name: str) -> TlsFiles:
        """The end's certificate and key, and the cluster's CA to verify peers with."""
        cert, key = self.ends[name]
        return TlsFiles(cert_file=str(cert), key_file=str(key), ca_file=str(self.ca_file))


def make_pki(
    directory: Path,
    names: Sequence[str],
    *,
    addresses: Mapping[str, Sequence[str]] | None = None,
    days: int = 30,
) -> Pki:
    """Make a CA and a certificate for each of ``names`` in ``directory`` (created; files
    of an earlier PKI there are replaced). ``addresses``: an end's IP addresses (default
    127.0.0.1). Raises :class:`PkiError` when ``openssl`` is missing or fails."""
    if shutil.which("openssl") is None:
        raise PkiError(
            "the certificates are made with the openssl command, which is not installed: "
            "install openssl (e.g. apt-get install openssl)"
        )
    directory.mkdir(parents=True, exist_ok=True)
    ca = _make_ca(directory, CA_NAME, days)
    outsider = None
    if any(name.startswith(OUTSIDER) for name in names):
        outsider = _make_ca(directory, f"{OUTSIDER}-{CA_NAME}", days)
    ends = {}
    for name in names:
        signer = outsider if outsider is not None and name.startswith(OUTSIDER) else ca
        ips = (addresses or {}).get(name) or DEFAULT_ADDRESSES
        ends[name] = _make_leaf(directory, name, ips, signer, days)
    return Pki(directory, ca[0], outsider[0] if outsider else None, ends)


def _openssl(*args: str) -> None:
    try:
        done = subprocess.run(
            ["openssl", *args],
            capture_output=True,
            text=True,
            timeout=OPENSSL_TIMEOUT_S,
            check=False,
        )
    except subprocess.TimeoutExpired:
        raise PkiError(f"openssl {args[0]} did not finish within {OPENSSL_TIMEOUT_S}s") from None
    if done.returncode != 0:
        raise PkiError(f"openssl {' '.join(args)} failed:\n{done.stderr.strip()}")


def _own_only(key: Path) -> None:
    os.chmod(key, 0o600)


def _make_ca(directory: Path, name: str, days: int) -> tuple[Path, Path]:
    cert, key = directory / f"{name}.pem", directory / f"{name}.key"
    _openssl(
        "req", "-x509", *_KEY, "-keyout", str(key), "-out", str(cert), "-days", str(days),
        "-subj", f"/CN=tidelog {name}", "-addext", "basicConstraints=critical,CA:TRUE",
        "-addext", "keyUsage=critical,keyCertSign,cRLSign",
    )  # fmt: skip
    _own_only(key)
    return cert, key


def _make_leaf(
    directory: Path, name: str, ips: Sequence[str], ca: tuple[Path, Path], days: int
) -> tuple[Path, Path]:
    cert, key, request = (directory / f"{name}{ext}" for ext in (".pem", ".key", ".csr"))
    extensions = directory / f"{name}.ext"
    names = [f"DNS:{name}", "DNS:localhost", *(f"IP:{ip}" for ip in ips)]
    extensions.write_text(
        "basicConstraints=CA:FALSE\n"
        "keyUsage=critical,digitalSignature\n"
        "extendedKeyUsage=serverAuth,clientAuth\n"
        f"subjectAltName={','.join(dict.fromkeys(names))}\n"
    )
    _openssl("req", *_KEY, "-keyout", str(key), "-out", str(request), "-subj", f"/CN={name}")
    _own_only(key)
    _openssl(
        "x509", "-req", "-in", str(request), "-CA", str(ca[0]), "-CAkey", str(ca[1]),
        "-CAcreateserial", "-out", str(cert), "-days", str(days), "-extfile", str(extensions),
    )  # fmt: skip
    request.unlink()
    extensions.unlink()
    return cert, key
