"""`swarmtune coordinator`: run a job's coordinator (gRPC) over its ledger in Redis."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import TYPE_CHECKING

from swarmtune.cli import CommandError, positive_int

if TYPE_CHECKING:
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

PUBLIC_KEY_HEX = 64
MIN_LEASE_TTL_S = 1.0


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--job", type=Path, required=True, help="job spec TOML file (see examples/)")
    store = parser.add_mutually_exclusive_group()
    store.add_argument("--redis-url", help="Redis URL (redis://, rediss://, unix://); default: $SWARMTUNE_REDIS_URL, else an embedded server")
    store.add_argument("--data-dir", type=Path, help="directory of the embedded Redis server (default: ~/.local/share/swarmtune/redis)")
    parser.add_argument("--listen", default="127.0.0.1:7070", help="HOST:PORT to serve gRPC on (default: %(default)s; port 0 picks one)")
    parser.add_argument("--key", type=Path, help="coordinator key file; created if missing (default: coordinator.key next to the embedded data, required with --redis-url)")
    parser.add_argument("--tls-cert", type=Path, help="PEM certificate chain for TLS")
    parser.add_argument("--tls-key", type=Path, help="PEM private key of --tls-cert")
    parser.add_argument("--tls-client-ca", type=Path, help="PEM CA that worker certificates must chain to (mutual TLS)")
    enrollment = parser.add_mutually_exclusive_group()
    enrollment.add_argument("--admit", nargs="+", default=[], metavar="KEY", help="worker public keys (hex, or files holding one or a worker's key PEM)")
    enrollment.add_argument("--open-enrollment", action="store_true", help="admit every worker that joins (use redundancy >= 2)")
    parser.add_argument(
        "--referee", nargs="+", default=[], metavar="KEY",
        help="keys of your own trusted workers, admitted as referees: they re-evaluate disputed and spot-checked "
        "members, their reward settles a member, and only disagreeing with them earns strikes (see docs/SECURITY.md)",
    )  # fmt: skip
    parser.add_argument("--metrics-port", type=int, help="serve Prometheus metrics on this port")
    parser.add_argument(
        "--metrics-host", default="127.0.0.1",
        help="the address the metrics port binds (default 127.0.0.1; 0.0.0.0 in a container, published with care)",
    )  # fmt: skip
    parser.add_argument(
        "--min-workers", type=positive_int, default=1, metavar="N", help="wait for N connected workers before opening the first iteration (default: %(default)s)"
    )
    parser.add_argument("--serve-after", action="store_true", help="keep serving ledger and status after the last iteration")
    parser.add_argument(
        "--redis-wait", type=seconds, metavar="SECONDS",
        help="while Redis cannot be reached at start-up, retry with backoff (0.5 s doubling to 30 s), giving up "
        "after SECONDS (exit 2; default: wait forever; 0: try once)",
    )  # fmt: skip
    parser.add_argument(
        "--lease-ttl", type=seconds, default=10.0, metavar="SECONDS",
        help="TTL of the job's lease in Redis, renewed every third of it; a second coordinator of the job stands "
        "by and takes over within about TTL + 1 s of this one's death (default: %(default)g)",
    )  # fmt: skip
    parser.add_argument("--log-json", action="store_true", help="log JSON lines instead of human-readable lines")


def seconds(text: str) -> float:
    """argparse type: a finite number of seconds, at least 0."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number of seconds, got {text!r}") from None
    if not 0 <= value < float("inf"):
        raise argparse.ArgumentTypeError(f"must be a finite number of seconds, at least 0, got {text}")
    return value


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
    from contextlib import ExitStack

    from swarmtune.coordinator import logs
    from swarmtune.coordinator.chain import ChainConflict
    from swarmtune.coordinator.lease import LeaseTimings
    from swarmtune.coordinator.server import ServerError, ServerOptions, Startup, main
    from swarmtune.coordinator.waiting import RedisWait
    from swarmtune.embedded_redis import EmbeddedRedis, default_data_dir
    from swarmtune.jobspec import JobSpecError, load_job_spec
    from swarmtune.store import StoreError, connect
    from swarmtune.tasks.base import TaskLoadError
    from swarmtune.tasks.registry import load_task

    logs.configure(args.log_json)
    if not args.admit and not args.open_enrollment:
        raise CommandError("no worker could join: pass --admit KEY... or --open-enrollment (--referee keys only re-evaluate)")
    if args.redis_url and args.key is None:
        raise CommandError("with --redis-url, pass --key FILE (the coordinator key that signs this job's ledger)")
    if args.lease_ttl < MIN_LEASE_TTL_S:
        raise CommandError(f"--lease-ttl {args.lease_ttl:g} is too short to renew the lease in time: give at least {MIN_LEASE_TTL_S:g} s")
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
        metrics_host=args.metrics_host,
        serve_after=args.serve_after,
        open_enrollment=args.open_enrollment,
        admit=admitted,
        referees=tuple(parse_public_key(text) for text in args.referee),
        min_workers=args.min_workers,
    )
    try:
        with ExitStack() as stack:
            # The embedded server is ours and starts (or fails) now; a Redis URL's server is waited for.
            url = args.redis_url or stack.enter_context(EmbeddedRedis(args.data_dir)).url
            startup = Startup(url, lambda: connect(url), RedisWait(args.redis_wait), LeaseTimings(args.lease_ttl))
            return asyncio.run(main(spec, key, admitted, (float(reward_range[0]), float(reward_range[1])), options, startup))
    except (ServerError, StoreError, ChainConflict) as exc:
        raise CommandError(str(exc)) from None
