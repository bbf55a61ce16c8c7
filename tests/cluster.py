"""Real processes on loopback for end-to-end tests: a coordinator, workers, ledger export and replay."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Protocol

import pytest

from swarmtune import entries, identity, ledgerfile
from swarmtune.demo.cluster import child_env
from swarmtune.entries import Iteration, Signed
from tests.tcp_proxy import TcpProxy
from tests.zygote import Zygote

ROOT = Path(__file__).resolve().parents[1]
TASK_FILE = Path(__file__).with_name("e2e_task.py")
POLL_S = 0.1
WAIT_S = 60.0  # for one event of a running job
JOB_TIMEOUT_S = 150.0

Event = dict[str, Any]


def free_port() -> int:
    with socket.create_server(("127.0.0.1", 0)) as probe:
        return int(probe.getsockname()[1])


def spec_text(
    job_id: str,
    model_dir: Path,
    *,
    iterations: int = 6,
    population: int = 6,
    redundancy: int = 1,
    retention_every: int = 0,
    deadline: float = 60.0,
    seed: int = 5,
) -> str:
    """A small dense job on the tiny model: rewards that vary, a few prompts and tokens."""
    retention = f'[retention]\ntask = "{TASK_FILE}:RETENTION"\nevery = {retention_every}\n' if retention_every else ""
    return f"""[job]
id = "{job_id}"
seed = {seed}
model = "{model_dir}"
iterations = {iterations}

[task]
name = "{TASK_FILE}:TASK"
prompts_per_iteration = 4
max_new_tokens = 6

[es]
population = {population}
sigma = 0.05
alpha = 0.01
anchored_decay = 0.001

[schedule]
deadline_seconds = {deadline}
redundancy = {redundancy}
attest_every = 1

{retention}"""


def parse_events(text: str) -> list[Event]:
    events = []
    for line in text.splitlines():
        if line.startswith("{"):
            try:
                events.append(json.loads(line))
            except json.JSONDecodeError:
                continue  # a line cut while being written
    return events


class Process(Protocol):
    """What tests do with a process: a `subprocess.Popen` or a `zygote.Child`."""

    def poll(self) -> int | None: ...

    def wait(self, timeout: float | None = None) -> int: ...

    def send_signal(self, signum: int) -> None: ...

    def kill(self) -> None: ...


@dataclass
class Proc:
    """A started process, its combined output file, and its JSON-line events."""

    name: str
    popen: Process
    log: Path

    def text(self) -> str:
        """The output so far ("" until the child has opened its log)."""
        return self.log.read_text(errors="replace") if self.log.exists() else ""

    def events(self, name: str | None = None) -> list[Event]:
        return [e for e in parse_events(self.text()) if name is None or e.get("event") == name]

    def wait_for(self, name: str, timeout: float, where: Callable[[Event], bool] = lambda e: True) -> Event:
        """The first event `name` satisfying `where`, waiting for it; fails with the log tail otherwise."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            found = [e for e in self.events(name) if where(e)]
            if found:
                return found[0]
            if self.popen.poll() is not None:
                break
            time.sleep(POLL_S)
        pytest.fail(f"{self.name}: no {name!r} event within {timeout}s (exit {self.popen.poll()}):\n{self.tail()}")

    def tail(self, lines: int = 40) -> str:
        return "\n".join(self.text().splitlines()[-lines:])

    def send(self, signum: int) -> None:
        self.popen.send_signal(signum)

    def wait(self, timeout: float) -> int:
        try:
            return self.popen.wait(timeout)
        except subprocess.TimeoutExpired:
            pytest.fail(f"{self.name} still running after {timeout}s:\n{self.tail()}")


@dataclass
class Cluster:
    """One job on loopback: spec file, keys, and every process started for it (all killed at the end)."""

    root: Path
    redis_url: str
    model_dir: Path
    spec: str
    zygote: Zygote | None = None  # None: every process starts from scratch (slower: ~9 CPU-s of imports)
    port: int = field(default_factory=free_port)
    procs: list[Proc] = field(default_factory=list)
    proxies: list[TcpProxy] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        self.spec_path = self.root / "job.toml"
        self.spec_path.write_text(self.spec)
        self.job_id = self.spec.split('id = "', 1)[1].split('"', 1)[0]
        self.coordinator_key = self.root / "coordinator.key"
        identity.save_private_key(identity.generate_key(), self.coordinator_key)
        self.worker_keys = [self.root / f"worker{i}.key" for i in range(4)]
        for path in self.worker_keys:
            identity.save_private_key(identity.generate_key(), path)

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def launch(self, name: str, module: str, args: list[str]) -> Proc:
        """`python -m module args...` in a new process (forked by the zygote if any); output to NAME.log."""
        log = self.root / f"{name}.log"
        if self.zygote is not None:
            process: Process = self.zygote.spawn(module, args, log)
        else:
            with log.open("ab") as out:
                process = subprocess.Popen(
                    [sys.executable, "-m", module, *args], stdout=out, stderr=subprocess.STDOUT, cwd=ROOT, env=child_env()
                )
        proc = Proc(name, process, log)
        self.procs.append(proc)
        return proc

    def coordinator(self, *extra: str, name: str = "coordinator") -> Proc:
        keys = [str(path) for path in self.worker_keys]
        args = [
            "coordinator", "--job", str(self.spec_path), "--redis-url", self.redis_url, "--key", str(self.coordinator_key),
            "--listen", self.address, "--log-json", "--admit", *keys, *extra,
        ]  # fmt: skip
        return self.launch(name, "swarmtune", args)

    def worker(self, index: int, *extra: str, address: str | None = None, liar: bool = False) -> Proc:
        """A worker that loads the base model (--model) before it first connects."""
        args = [
            "--coordinator", address or self.address, "--key", str(self.worker_keys[index]), "--model", str(self.model_dir),
            "--capacity", "2", "--log-json", *extra,
        ]  # fmt: skip
        if liar:
            return self.launch(f"worker{index}", "tests.lying_worker", args)
        return self.launch(f"worker{index}", "swarmtune", ["worker", *args])

    def proxy(self, gated: bool = False) -> TcpProxy:
        proxy = TcpProxy(self.port, gated)
        self.proxies.append(proxy)
        return proxy

    def start(self, workers: int, liars: tuple[int, ...] = (), tls: bool = False) -> tuple[Proc, list[Proc], TcpProxy]:
        """The coordinator and workers (through a proxy); with --min-workers every worker takes part from
        iteration 1 however long each took to start. With `tls`, over TLS."""
        served: tuple[str, ...] = ()
        trusted: tuple[str, ...] = ()
        if tls:
            cert, key = self_signed_certificate(self.root)
            served, trusted = ("--tls-cert", str(cert), "--tls-key", str(key)), ("--tls-ca", str(cert))
        coordinator = self.coordinator("--serve-after", "--min-workers", str(workers), *served)
        proxy = self.proxy()
        started = [self.worker(i, *trusted, address=f"127.0.0.1:{proxy.port}", liar=i in liars) for i in range(workers)]
        return coordinator, started, proxy

    def finish(self, coordinator: Proc, workers: list[Proc], timeout: float = JOB_TIMEOUT_S) -> None:
        """Wait for the job to finish and the workers to leave with status 0, then stop the coordinator
        (serving after the job, so late reconnecting workers and last attestations get through): status 0."""
        coordinator.wait_for("job finished", timeout)
        for worker in workers:
            assert worker.wait(WAIT_S) == 0, worker.tail()
        coordinator.send(signal.SIGTERM)
        assert coordinator.wait(WAIT_S) == 0, coordinator.tail()

    def run(self, name: str, *argv: str) -> list[dict[str, Any]]:
        """A `swarmtune` command in its own process, to completion; the JSON objects it printed."""
        proc = self.launch(name, "swarmtune", list(argv))
        assert proc.wait(120) == 0, proc.tail()
        return parse_events(proc.text())

    def export(self) -> Path:
        out = self.root / "ledger.bin"
        self.run("export", "ledger", "export", "--redis-url", self.redis_url, "--job", self.job_id, "--out", str(out), "--force")
        return out

    def replay(self, ledger: Path) -> tuple[dict[int, str], dict[str, Any]]:
        """`swarmtune replay --each` in a separate process: the hash after every iteration, and the summary."""
        lines = self.run("replay", "replay", "--ledger", str(ledger), "--each", "--json")
        return {line["iteration"]: line["state_hash"] for line in lines[:-1]}, lines[-1]

    def close(self) -> None:
        for proxy in self.proxies:
            proxy.close()
        for proc in self.procs:
            if proc.popen.poll() is None:
                proc.popen.kill()
                proc.popen.wait(30)


def self_signed_certificate(directory: Path) -> tuple[Path, Path]:
    """A CA-capable certificate for 127.0.0.1 and its key (PEM files): the coordinator serves it, workers trust it."""
    import datetime
    import ipaddress

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "swarmtune test coordinator")])
    now = datetime.datetime.now(datetime.timezone.utc)
    certificate = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), critical=False)
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    cert_path, key_path = directory / "coordinator.crt", directory / "coordinator-tls.key"
    cert_path.write_bytes(certificate.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    )
    return cert_path, key_path


def ledger_entries(path: Path) -> list[entries.StoredEntry]:
    return [entries.parse_entry(stored) for stored in ledgerfile.read(path)]


def iterations(stored: list[entries.StoredEntry]) -> list[Iteration]:
    return [e.entry.body for e in stored if isinstance(e.entry.body, Iteration)]


def attestations(stored: list[entries.StoredEntry]) -> Iterator[entries.Attestation]:
    for e in stored:
        if isinstance(e.entry.body, Signed) and isinstance(e.entry.body.record, entries.Attestation):
            yield e.entry.body.record


def attested_by_logs(worker: Proc) -> dict[int, str]:
    """iteration -> state hash, as the worker computed and signed it."""
    return {e["iteration"]: e["state_hash"] for e in worker.events("attesting")}


def assert_attestations_match(replayed: dict[int, str], stored: list[entries.StoredEntry], workers: list[Proc]) -> None:
    """Every attestation in the ledger and every hash a worker attested equals the replayed hash."""
    recorded = list(attestations(stored))
    assert recorded, "the ledger holds no attestation"
    for attestation in recorded:
        assert attestation.state_hash.hex() == replayed[attestation.iteration], attestation
    for worker in workers:
        hashes = attested_by_logs(worker)
        assert hashes, worker.tail()
        assert all(replayed[t] == h for t, h in hashes.items()), (worker.name, hashes, replayed)


def key_of(path: Path) -> bytes:
    return identity.public_key_bytes(identity.load_private_key(path))


def kill(proc: Proc) -> None:
    proc.send(signal.SIGKILL)
    proc.popen.wait(30)


# make(name, redis_url, spec) -> a Cluster (the `clusters` fixture of tests.e2e_fixtures)
Clusters = Callable[[str, str, str], Cluster]
