"""Real processes on loopback for end-to-end tests: a coordinator, workers, ledger export and replay."""

from __future__ import annotations

import signal
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

from swarmtune import entries, identity, ledger, ledgerfile
from swarmtune.demo.cluster import free_port
from swarmtune.entries import Iteration, Signed
from tests.support.processes import Proc, launch, parse_events
from tests.support.specs import Table, job_spec
from tests.support.tcp_proxy import TcpProxy
from tests.support.zygote import Zygote

TASK_FILE = Path(__file__).with_name("e2e_task.py")
WAIT_S = 60.0  # for one event of a running job
JOB_TIMEOUT_S = 150.0


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
    noise: Table | None = None,
) -> str:
    """A small job on the tiny model (dense noise unless `noise`): rewards that vary, a few prompts and tokens."""
    return job_spec(
        job_id,
        model=model_dir,
        seed=seed,
        iterations=iterations,
        task={"name": f"{TASK_FILE}:TASK", "prompts_per_iteration": 4, "max_new_tokens": 6},
        es={"population": population, "sigma": 0.05, "alpha": 0.01, "anchored_decay": 0.001},
        noise=noise,
        schedule={"deadline_seconds": deadline, "redundancy": redundancy, "attest_every": 1},
        retention={"task": f"{TASK_FILE}:RETENTION", "every": retention_every} if retention_every else None,
    )


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
        proc = launch(name, module, args, self.root / f"{name}.log", self.zygote)
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
            return self.launch(f"worker{index}", "tests.support.lying_worker", args)
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

    def checked_ledger(self, honest: list[Proc]) -> tuple[list[entries.StoredEntry], dict[int, str], dict[str, Any]]:
        """Export the ledger, verify it, replay it (in a separate process) and check that every attestation
        and every hash an honest worker attested equals the replay: the entries, replayed hashes and summary."""
        path = self.export()
        report = ledgerfile.verify_file(path)
        assert report.ok, report.problem
        stored = ledger_entries(path)
        replayed, summary = self.replay(path)
        assert_attestations_match(replayed, stored, honest)
        return stored, replayed, summary

    def close(self) -> None:
        for proxy in self.proxies:
            proxy.close()
        for proc in self.procs:
            proc.kill()


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
    """The verified entries of a ledger file (the walk derives each iteration's coefficients)."""
    return [entry for _, entry in ledger.walk(ledgerfile.read(path))]


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


# make(name, redis_url, spec) -> a Cluster (the `clusters` fixture of tests/e2e/conftest.py)
Clusters = Callable[[str, str, str], Cluster]
