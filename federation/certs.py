"""The federation's TLS certificates and SuperNode keys in one command, without openssl or ssh-keygen.

    python -m federation.certs server coordinator.example.org 203.0.113.5   # in the coordinator's cert folder
    python -m federation.certs node-key node                                # at an institution: node.key, node.key.pub

`server` writes a private CA (`ca.crt`, `ca.key`) and a server certificate (`server.pem`,
`server.key`) whose subject alternative names are the names and IP addresses given: a SuperNode
checks the address it dials against them, so list every name and IP the institutions will use.
Run it again with other names to re-issue the server certificate: an existing CA is kept, so the
`ca.crt` the institutions already hold stays valid. `ca.key` never leaves the coordinator;
`ca.crt` is what every SuperNode and `flwr` user gets.

`node-key` writes an ECDSA P-384 key pair in OpenSSH format, what `ssh-keygen -t ecdsa -b 384`
writes: `<name>.key.pub` goes to the coordinator (`flwr supernode register`), `<name>.key` stays
with the SuperNode (`--auth-supernode-private-key`).
"""

from __future__ import annotations

import argparse
import datetime as dt
import ipaddress
import sys
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

CA_DAYS = 3650
SERVER_DAYS = 825  # the longest server-certificate life common TLS clients accept
_BACKDATE = dt.timedelta(minutes=5)  # tolerate a coordinator clock a little ahead of the node's


def subject_alt_names(names: list[str]) -> list[x509.GeneralName]:
    """Each name as an IP address SAN when it parses as one, else as a DNS name; refuse what is neither."""
    if not names:
        raise ValueError("give at least one name or IP address the SuperNodes will dial (e.g. the coordinator's)")
    sans: list[x509.GeneralName] = []
    for name in names:
        try:
            sans.append(x509.IPAddress(ipaddress.ip_address(name)))
            continue
        except ValueError:
            pass
        label = name.removeprefix("*.")
        if not label or any(c in label for c in " /:@") or label.startswith("-") or ".." in label:
            raise ValueError(f"{name!r} is neither an IP address nor a host name")
        sans.append(x509.DNSName(name))
    return sans


def _write_private(path: Path, key, fmt=serialization.PrivateFormat.PKCS8) -> None:
    """Write a private key readable by its owner only (created 0600, never world-readable in between)."""
    data = key.private_bytes(serialization.Encoding.PEM, fmt, serialization.NoEncryption())
    path.unlink(missing_ok=True)
    path.touch(mode=0o600)
    path.write_bytes(data)


def _ca(directory: Path, now: dt.datetime) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    """The folder's CA, made on first use and kept after."""
    cert_path, key_path = directory / "ca.crt", directory / "ca.key"
    if cert_path.exists() and key_path.exists():
        key = serialization.load_pem_private_key(key_path.read_bytes(), password=None)
        return x509.load_pem_x509_certificate(cert_path.read_bytes()), key
    if cert_path.exists() or key_path.exists():
        raise FileExistsError(f"{directory} holds only one of ca.crt and ca.key: restore the other or remove both")
    key = ec.generate_private_key(ec.SECP384R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "spes-flower federation CA")])
    usage = x509.KeyUsage(
        digital_signature=True,
        key_cert_sign=True,
        crl_sign=True,
        content_commitment=False,
        key_encipherment=False,
        data_encipherment=False,
        key_agreement=False,
        encipher_only=False,
        decipher_only=False,
    )
    cert = (
        _builder(name, name, key.public_key(), now, CA_DAYS)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(usage, critical=True)
        .sign(key, hashes.SHA256())
    )
    _write_private(key_path, key)
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    return cert, key


def _builder(subject, issuer, public_key, now: dt.datetime, days: int) -> x509.CertificateBuilder:
    return (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(issuer)
        .public_key(public_key)
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - _BACKDATE)
        .not_valid_after(now + dt.timedelta(days=days))
    )


def write_server_certs(directory: Path, names: list[str], days: int = SERVER_DAYS) -> dict[str, Path]:
    """Write ca.crt/ca.key (unless there) and a new server.pem/server.key for `names`; return the paths."""
    sans = subject_alt_names(names)
    directory.mkdir(parents=True, exist_ok=True)
    now = dt.datetime.now(dt.UTC)
    ca_cert, ca_key = _ca(directory, now)
    key = ec.generate_private_key(ec.SECP384R1())
    cert = (
        _builder(
            x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, names[0])]), ca_cert.subject, key.public_key(), now, days
        )
        .add_extension(x509.SubjectAlternativeName(sans), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    paths = {name: directory / name for name in ("ca.crt", "ca.key", "server.pem", "server.key")}
    _write_private(paths["server.key"], key)
    paths["server.pem"].write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    return paths


def write_node_key(directory: Path, name: str) -> tuple[Path, Path]:
    """Write `<name>.key` (OpenSSH private key) and `<name>.key.pub`; refuse to replace an existing key."""
    return write_key_pair(directory, name, ec.generate_private_key(ec.SECP384R1()))


def write_key_pair(directory: Path, name: str, key) -> tuple[Path, Path]:
    """Write `key` as `<name>.key` (OpenSSH private, 0600) and `<name>.key.pub`; refuse to replace a key."""
    private, public = directory / f"{name}.key", directory / f"{name}.key.pub"
    if private.exists():
        raise FileExistsError(
            f"{private} exists: a registered node or a trusted signer keeps its key (remove the file for a new one)"
        )
    directory.mkdir(parents=True, exist_ok=True)
    _write_private(private, key, serialization.PrivateFormat.OpenSSH)  # flower-supernode reads only this format
    openssh = serialization.PublicFormat.OpenSSH
    public.write_bytes(key.public_key().public_bytes(serialization.Encoding.OpenSSH, openssh) + b"\n")
    return private, public


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m federation.certs", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    server = sub.add_parser("server", help="the CA and the SuperLink's certificate")
    server.add_argument("names", nargs="+", help="the coordinator's host names and IP addresses (the SANs)")
    server.add_argument("--out", type=Path, default=Path("."), help="folder to write into (default: here)")
    server.add_argument(
        "--days", type=int, default=SERVER_DAYS, help=f"server certificate life (default {SERVER_DAYS})"
    )
    node = sub.add_parser("node-key", help="a SuperNode's authentication key pair")
    node.add_argument("name", nargs="?", default="node", help="file stem (default: node -> node.key, node.key.pub)")
    node.add_argument("--out", type=Path, default=Path("."), help="folder to write into (default: here)")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        if args.command == "server":
            if args.days < 1:
                raise ValueError("--days must be at least 1")
            paths = write_server_certs(args.out, args.names, args.days)
            print(f"wrote {', '.join(str(p) for p in paths.values())} (SANs: {', '.join(args.names)})")
            print("give ca.crt to every SuperNode and flwr user; keep ca.key and server.key on the coordinator")
        else:
            private, public = write_node_key(args.out, args.name)
            print(f"wrote {private} (keep it) and {public} (send it to the coordinator)")
    except (ValueError, FileExistsError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
