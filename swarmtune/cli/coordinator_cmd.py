"""`swarmtune coordinator`: run a job's coordinator (gRPC) over its ledger in Redis."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import TYPE_CHECKING

from swarmtune.cli import CommandError, positive_int

if TYPE_CHECKING:
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

PUBLIC_KEY_HEX = 64


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--job", type=Path, required=True, help="job spec TOML file (see examples/)")
    store = parser.add_mutually_exclusive_group()
    store.add_argument("--redis-url", help="Redis URL (redis://, rediss://, unix://); default: an embedded server")
    store.add_argument("--data-dir", type=Path, help="directory of the embedded Redis server (default: ~/.local/share/swarmtune/redis)")
    parser.add_argument("--listen", default="127.0.0.1:7070", help="HOST:PORT to serve gRPC on (default: %(default)s; port 0 picks one)")
    parser.add_argument("--key", type=Path, help="coordinator key file; created if missing (default: coordinator.key next to the embedded data, required with --redis-url)")
    parser.add_argument("--tls-cert", type=Path, help="PEM certificate chain for TLS")
    parser.add_argument("--tls-key", type=Path, help="PEM private key of --tls-cert")
    parser.add_argument("--tls-client-ca", type=Path, help="PEM CA that worker certificates must chain to (mutual TLS)")
    enrollment = parser.add_mutually_exclusive_group()
    enrollment.add_argument("--admit", nargs="+", default=[], metavar="KEY", help="worker public keys (hex, or files holding one or a worker's key PEM)")
    enrollment.add_argument("--open-enrollment", action="store_true", help="admit every worker that joins (use redundancy >= 2)")
    parser.add_argument("--metrics-port", type=int, help="serve Prometheus metrics on this port (127.0.0.1)")
    parser.add_argument(
        "--min-workers", type=positive_int, default=1, metavar="N", help="wait for N connected workers before opening the first iteration (default: %(default)s)"
    )
    parser.add_argument("--serve-after", action="store_true", help="keep serving ledger and status after the last iteration")
    parser.add_argument("--log-json", action="store_true", help="log JSON lines instead of human-readable lines")


def parse_public_key(text: str) -> bytes:
    """A worker public key from hex, a file holding the hex, or a worker's private key PEM file."""
    from swarmtune import identity

    candidate = text.strip()
    path = Path(candidate)
    if not (len(candidate) == PUBLIC_KEY_HEX and all(c in "0123456789abcdefABCDEF" for c in candidate)) and path.is_file():
        content = path.read_text(errors="replace").strip()
        if "PRIVATE KEY" in content:
            try:
                return identity.public_key_bytes(identity.load_private_key(path))
            except identity.IdentityError as exc:
                raise CommandError(str(exc)) from None
        candidate = content.split()[0] if content else ""
    try:
        key = bytes.fromhex(candidate)
        identity.load_public_key(key)
    except ValueError:
        raise CommandError(f"--admit {text!r}: expected a 64-hex-digit Ed25519 public key (see `swarmtune keygen`), or a file holding one") from None
    return key


def coordinator_key(path: Path) -> Ed25519PrivateKey:
    """Load the key at `path`, creating it on first use."""
    from swarmtune import identity

    try:
        if not path.exists():
            path.parent.mkdir(parents=True, exist_ok=True)
            identity.save_private_key(identity.generate_key(), path)
        return identity.load_private_key(path)
    except identity.IdentityError as exc:
        raise CommandError(str(exc)) from None


def run(args: argparse.Namespace) -> int:
    import asyncio

    from swarmtune.coordinator import logs
    from swarmtune.coordinator.chain import ChainConflict
    from swarmtune.coordinator.server import ServerError, ServerOptions, genesis_from_model, open_history, serve
    from swarmtune.embedded_redis import default_data_dir, open_store
    from swarmtune.jobspec import JobSpecError, load_job_spec
    from swarmtune.store import StoreError
    from swarmtune.tasks.base import TaskLoadError
    from swarmtune.tasks.registry import load_task

    logs.configure(args.log_json)
    if not args.admit and not args.open_enrollment:
        raise CommandError("no worker could join: pass --admit KEY... or --open-enrollment")
    if args.redis_url and args.key is None:
        raise CommandError("with --redis-url, pass --key FILE (the coordinator key that signs this job's ledger)")
    try:
        spec = load_job_spec(args.job)
        reward_range = tuple(load_task(spec.task, **spec.task_options).reward_range)
    except JobSpecError as exc:
        raise CommandError(str(exc)) from None
    except TaskLoadError as exc:
        raise CommandError(f"task of {args.job}: {exc}") from None
    admitted = tuple(parse_public_key(text) for text in args.admit)
    key = coordinator_key(args.key or (args.data_dir or default_data_dir()).parent / "coordinator.key")
    options = ServerOptions(
        listen=args.listen,
        tls_cert=args.tls_cert,
        tls_key=args.tls_key,
        tls_client_ca=args.tls_client_ca,
        metrics_port=args.metrics_port,
        serve_after=args.serve_after,
        open_enrollment=args.open_enrollment,
        admit=admitted,
        min_workers=args.min_workers,
    )
    try:
        with open_store(args.redis_url, args.data_dir) as store:
            history = open_history(store, spec, key, admitted, lambda: genesis_from_model(spec, key, admitted))
            return asyncio.run(serve(spec, store, key, history, (float(reward_range[0]), float(reward_range[1])), options))
    except (ServerError, StoreError, ChainConflict) as exc:
        raise CommandError(str(exc)) from None
