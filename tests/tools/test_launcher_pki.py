"""The throwaway PKI of `cluster up --tls` and the TLS tests: each certificate names its
end (for ``tls_peer_names``), localhost and its addresses, is signed by the cluster's CA
(an outsider's by another CA), and its key is the owner's only; without ``openssl`` the
error says what to install."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from tools.launcher.pki import PkiError, make_pki


def _names(cert: Path) -> set[str]:
    """The certificate's subject alternative names, as openssl prints them."""
    done = subprocess.run(
        ["openssl", "x509", "-noout", "-ext", "subjectAltName", "-in", str(cert)],
        capture_output=True,
        text=True,
        check=True,
    )
    return set(done.stdout.splitlines()[-1].strip().split(", "))


def _signed_by(ca: Path, cert: Path) -> bool:
    done = subprocess.run(
        ["openssl", "verify", "-CAfile", str(ca), str(cert)], capture_output=True, check=False
    )
    return done.returncode == 0


def test_certificates_name_their_node_and_addresses(tmp_path: Path) -> None:
    pki = make_pki(
        tmp_path / "tls", ("node-1", "node-2", "outsider"), addresses={"node-2": ["127.0.0.2"]}
    )
    assert pki.ca_file == tmp_path / "tls" / "ca.pem"
    cert, key = pki.ends["node-1"]
    assert _names(cert) == {"DNS:node-1", "DNS:localhost", "IP Address:127.0.0.1"}
    assert "IP Address:127.0.0.2" in _names(pki.ends["node-2"][0])
    assert key.stat().st_mode & 0o077 == 0
    assert (tmp_path / "tls" / "ca.key").stat().st_mode & 0o077 == 0
    assert _signed_by(pki.ca_file, cert)
    assert pki.outsider_ca_file is not None
    assert not _signed_by(pki.ca_file, pki.ends["outsider"][0])
    assert _signed_by(pki.outsider_ca_file, pki.ends["outsider"][0])
    assert pki.files("node-1").ca_file == str(pki.ca_file)
    assert make_pki(tmp_path / "plain", ("n1",)).outsider_ca_file is None


def test_without_openssl_the_error_says_to_install_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("PATH", str(tmp_path))
    with pytest.raises(PkiError, match="install openssl"):
        make_pki(tmp_path / "tls", ("n1",))
