"""`swarmtune keygen`: create an Ed25519 identity for a worker or a coordinator."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from swarmtune.cli import CommandError


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--out", type=Path, required=True, help="private key file to create (mode 0600; never overwritten)"
    )
    parser.add_argument("--json", action="store_true", help="print {path, public_key, fingerprint} as JSON")


def run(args: argparse.Namespace) -> int:
    from swarmtune import identity

    key = identity.generate_key()
    try:
        identity.save_private_key(key, args.out)
    except identity.IdentityError as exc:
        raise CommandError(str(exc)) from None
    public = identity.public_key_bytes(key)
    shown = {"path": str(args.out), "public_key": public.hex(), "fingerprint": identity.fingerprint(public)}
    if args.json:
        print(json.dumps(shown))
    else:
        print(f"private key: {args.out} (keep it secret)")
        print(f"public key:  {shown['public_key']}")
        print(f"fingerprint: {shown['fingerprint']}")
    return 0
