"""federation.certs: the certificates it writes pass a real TLS handshake for the names given and no
other, a re-issue keeps the CA, and keys are the owner's only."""

from __future__ import annotations

import socket
import ssl
import stat
import subprocess
import sys
import threading
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.serialization import load_ssh_private_key, load_ssh_public_key

from federation.certs import main, subject_alt_names, write_node_key, write_server_certs

ROOT = Path(__file__).resolve().parent.parent


def _handshake(certs: dict[str, Path], server_name: str) -> None:
    """A TLS server on 127.0.0.1 with server.pem/server.key; a client trusting only ca.crt dials it
    under `server_name`. Raises ssl.SSLCertVerificationError where the name is not covered."""
    server_ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    server_ctx.load_cert_chain(certs["server.pem"], certs["server.key"])
    client_ctx = ssl.create_default_context(cafile=str(certs["ca.crt"]))
    with socket.create_server(("127.0.0.1", 0)) as listener:

        def serve():
            conn, _ = listener.accept()
            try:
                with server_ctx.wrap_socket(conn, server_side=True) as tls:
                    tls.sendall(b"ok")
            except (ssl.SSLError, OSError):
                pass  # the client refused the certificate

        thread = threading.Thread(target=serve, daemon=True)
        thread.start()
        with (
            socket.create_connection(listener.getsockname(), timeout=10) as raw,
            client_ctx.wrap_socket(raw, server_hostname=server_name) as tls,
        ):
            assert tls.recv(2) == b"ok"
        thread.join(10)


def test_server_certificate_is_accepted_for_its_names_and_refused_for_others(tmp_path):
    certs = write_server_certs(tmp_path, ["coordinator.example.org", "127.0.0.1", "localhost"])
    _handshake(certs, "127.0.0.1")
    _handshake(certs, "localhost")
    with pytest.raises(ssl.SSLCertVerificationError):
        _handshake(certs, "other.example.org")  # a SAN the command was not given
    cert = x509.load_pem_x509_certificate(certs["server.pem"].read_bytes())
    sans = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert sans.get_values_for_type(x509.DNSName) == ["coordinator.example.org", "localhost"]
    assert [str(ip) for ip in sans.get_values_for_type(x509.IPAddress)] == ["127.0.0.1"]


def test_reissue_keeps_the_ca_so_institutions_keep_their_ca_crt(tmp_path):
    first = write_server_certs(tmp_path, ["localhost"])
    ca_before, server_before = first["ca.crt"].read_bytes(), first["server.pem"].read_bytes()
    second = write_server_certs(tmp_path, ["127.0.0.1"])
    assert second["ca.crt"].read_bytes() == ca_before
    assert second["server.pem"].read_bytes() != server_before
    _handshake(second, "127.0.0.1")  # the new certificate under the old CA
    with pytest.raises(ssl.SSLCertVerificationError):
        _handshake(second, "localhost")  # the re-issue names only what it was given


def test_private_keys_are_owner_only_and_a_lone_ca_file_is_refused(tmp_path):
    certs = write_server_certs(tmp_path / "a", ["localhost"])
    for name in ("ca.key", "server.key"):
        assert stat.S_IMODE(certs[name].stat().st_mode) == 0o600, name
    certs["ca.key"].unlink()
    with pytest.raises(FileExistsError, match="only one of ca.crt and ca.key"):
        write_server_certs(tmp_path / "a", ["localhost"])  # never a silent new CA beside the old ca.crt


def test_node_key_is_an_openssh_p384_pair_and_never_overwritten(tmp_path):
    private, public = write_node_key(tmp_path, "site")
    key = load_ssh_private_key(private.read_bytes(), password=None)
    assert isinstance(key.curve, ec.SECP384R1) and stat.S_IMODE(private.stat().st_mode) == 0o600
    assert load_ssh_public_key(public.read_bytes()).public_numbers() == key.public_key().public_numbers()
    assert public.read_text().startswith("ecdsa-sha2-nistp384 ")
    before = private.read_bytes()
    with pytest.raises(FileExistsError, match="keeps its key"):
        write_node_key(tmp_path, "site")
    assert private.read_bytes() == before


@pytest.mark.parametrize("bad", [[], ["two words"], ["http://host"], ["-host"], ["a..b"], ["user@host"]])
def test_bad_names_are_refused(bad):
    with pytest.raises(ValueError):
        subject_alt_names(bad)


def test_command_line_reports_errors_without_a_traceback(tmp_path, capsys):
    assert main(["server", "--out", str(tmp_path), "bad name"]) == 2
    assert "neither an IP address nor a host name" in capsys.readouterr().err
    assert not (tmp_path / "ca.crt").exists()  # refused before anything was written
    assert main(["server", "--out", str(tmp_path), "--days", "0", "localhost"]) == 2
    res = subprocess.run(
        [sys.executable, "-m", "federation.certs", "node-key", "--out", str(tmp_path)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert res.returncode == 0 and (tmp_path / "node.key.pub").exists(), res.stderr
