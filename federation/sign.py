"""The federation operator signs the app; SuperNodes that trust the operator's key run only it.

    python -m federation.sign key operator                # once: operator.key (keep it), operator.key.pub
    python -m federation.sign app . --key operator.key    # in the reviewed checkout, before `flwr run . <fed>`

`key` writes an ed25519 key pair in OpenSSH format (what `ssh-keygen -t ed25519` writes; such a key
works too). The public half goes to every institution, which starts its node with
`python -m client_app.supernode --trust operator.key.pub ...`.

`app` builds the bundle exactly as `flwr run` will (Flower's builder, the checkout's .gitignore
applied), signs the {path: sha256} of its files and writes the signature to `app-signature.json`
in the checkout, where `flwr run` picks it up. Any file changed, added or removed after signing
makes every trusting node refuse the bundle: sign last, then run.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from cryptography.hazmat.primitives.asymmetric import ed25519
from cryptography.hazmat.primitives.serialization import load_ssh_private_key

from common.app_bundle import SIGNATURE_FILE, bundle_files, fingerprint, signature_document
from federation.certs import write_key_pair


def load_signing_key(path: Path) -> ed25519.Ed25519PrivateKey:
    """The ed25519 private key in an OpenSSH key file (unencrypted)."""
    try:
        key = load_ssh_private_key(Path(path).read_bytes(), password=None)
    except (ValueError, TypeError) as exc:
        raise ValueError(f"{path}: not an unencrypted OpenSSH private key ({exc})") from exc
    if not isinstance(key, ed25519.Ed25519PrivateKey):
        raise ValueError(f"{path}: an app-signing key must be ed25519, got {type(key).__name__}")
    return key


def sign_app(root: Path, key: ed25519.Ed25519PrivateKey) -> tuple[Path, int]:
    """Write `<root>/app-signature.json` over the bundle Flower builds from `root`; (its path, files signed)."""
    from flwr.cli.build import build_fab_from_disk

    if not (root / "pyproject.toml").is_file():
        raise ValueError(f"{root}: no pyproject.toml there (give the app's checkout)")
    files = bundle_files(build_fab_from_disk(root))
    path = root / SIGNATURE_FILE
    tmp = path.with_suffix(".tmp")
    tmp.write_text(signature_document(files, key))
    tmp.replace(path)
    return path, len(files)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m federation.sign", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    key = sub.add_parser("key", help="the operator's app-signing key pair (ed25519, OpenSSH format)")
    key.add_argument("name", nargs="?", default="operator", help="file stem (default: operator)")
    key.add_argument("--out", type=Path, default=Path("."), help="folder to write into (default: here)")
    app = sub.add_parser("app", help=f"sign the app in a checkout (writes {SIGNATURE_FILE} there)")
    app.add_argument("root", nargs="?", type=Path, default=Path("."), help="the app's checkout (default: here)")
    app.add_argument("--key", type=Path, required=True, help="the operator's private key file")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        if args.command == "key":
            private, public = write_key_pair(args.out, args.name, ed25519.Ed25519PrivateKey.generate())
            print(f"wrote {private} (keep it) and {public} (give it to every institution: --trust {public.name})")
        else:
            key = load_signing_key(args.key)
            path, count = sign_app(args.root.resolve(), key)
            print(f"signed {count} files with {fingerprint(key.public_key())}: {path}")
            print(f"now `flwr run {args.root} <federation>`; a change to any file before then voids the signature")
    except (ValueError, FileExistsError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
