"""The Redis ledger store: one stream per job, atomic compare-and-append, open-iteration state."""

from __future__ import annotations

import enum
import os
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Callable, Iterator, Mapping
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

import redis
from redis.backoff import ExponentialBackoff
from redis.retry import Retry

from swarmtune import entries
from swarmtune.headcheck import Head, head_advice, head_problem, id_problem

# Keys of one job. The braces are a Redis Cluster hash tag: every key of a job lands in one slot,
# which the multi-key append script needs.
LEDGER_KEY = "swarmtune:{{{job}}}:ledger"
HEAD_KEY = "swarmtune:{{{job}}}:head"
OPEN_KEY = "swarmtune:{{{job}}}:open"
LEASE_KEY = "swarmtune:{{{job}}}:lease"  # the active coordinator's token, with a TTL it renews
HEAD_PATTERN = "swarmtune:{*}:head"
ENTRY_FIELD = b"e"
READ_BATCH = 512

# The Redis commands each role sends, for ACL users (docs/REDIS.md); the connection's handshake
# (HELLO/AUTH) needs no permission. The append script runs HMGET, XRANGE, XADD, HSET and DEL as the
# calling user. Any new command the store sends belongs here: the TLS/ACL tests run a real
# coordinator and the auditor commands with exactly these permissions.
COORDINATOR_COMMANDS = (
    "ping", "hmget", "hgetall", "hset", "del", "xrange", "xadd", "evalsha", "script|load", "set", "get", "pttl", "pexpire",
)  # fmt: skip
AUDITOR_COMMANDS = ("ping", "hmget", "xrange", "scan")
# URL query parameters naming files that rediss:// connections read (redis-py's SSL options).
TLS_FILE_PARAMETERS = ("ssl_ca_certs", "ssl_ca_path", "ssl_certfile", "ssl_keyfile")

# Compare-and-append, atomic because Redis runs a script without interleaving other commands.
# KEYS: ledger stream, head hash, open-iteration hash, and (a coordinator's fenced store) the lease.
# ARGV: index, prev_hash, entry hash, stored bytes, "1" to delete the open-iteration state with the
# append, and the lease token the writer holds. Replies {status, head index, head hash}; head index -1
# when the job has no entry. The lease is checked here, not only before sending: a process paused
# between its own check and the write would otherwise append after a standby took over.
APPEND_SCRIPT = """
local index = tonumber(ARGV[1])
local head = redis.call('HMGET', KEYS[2], 'index', 'hash')
local next_index, head_hash = 0, string.rep('\\0', 32)
if head[1] then next_index, head_hash = tonumber(head[1]) + 1, head[2] end
local function reply(status)
  return {status, next_index - 1, head_hash}
end
if KEYS[4] and redis.call('GET', KEYS[4]) ~= ARGV[6] then return reply('fenced') end
if index < next_index then
  local id = ARGV[1] .. '-1'
  local found = redis.call('XRANGE', KEYS[1], id, id)
  if found[1] and found[1][2][2] == ARGV[4] then return reply('duplicate') end
  return reply('taken')
end
if index > next_index then return reply('gap') end
if ARGV[2] ~= head_hash then return reply('stale') end
redis.call('XADD', KEYS[1], ARGV[1] .. '-1', 'e', ARGV[4])
redis.call('HSET', KEYS[2], 'index', ARGV[1], 'hash', ARGV[3])
if ARGV[5] == '1' then redis.call('DEL', KEYS[3]) end
next_index, head_hash = index + 1, ARGV[3]
return reply('appended')
"""

# Repair of a head record: set it to the stream's last entry, atomically checking that the entry is
# still the last one (nothing appended since it was verified). KEYS: ledger stream, head hash.
# ARGV: that entry's id, index, hash. Replies 1 when set, 0 when the stream moved.
REPAIR_HEAD_SCRIPT = """
if not redis.call('XRANGE', KEYS[1], ARGV[1], ARGV[1])[1] then return 0 end
if redis.call('XRANGE', KEYS[1], '(' .. ARGV[1], '+', 'COUNT', 1)[1] then return 0 end
redis.call('HSET', KEYS[2], 'index', ARGV[2], 'hash', ARGV[3])
return 1
"""

# A fenced write of the open-iteration state, iff the lease still holds the writer's token (as above).
# KEYS: open-iteration hash, lease. ARGV: token, then "del", or "set" and field, value, field, value, ...
# Replies 1 when written, 0 when the lease is not the writer's (nothing written).
OPEN_WRITE_SCRIPT = """
if redis.call('GET', KEYS[2]) ~= ARGV[1] then return 0 end
if ARGV[2] == 'del' then redis.call('DEL', KEYS[1]) return 1 end
for i = 3, #ARGV, 2 do redis.call('HSET', KEYS[1], ARGV[i], ARGV[i + 1]) end
return 1
"""

# The job's lease (one active coordinator; docs/PROTOCOL.md §6.8). Take: set it to our token if no
# one holds it; else reply who does and for how many more ms. KEYS: lease. ARGV: token, TTL ms.
TAKE_LEASE_SCRIPT = """
if redis.call('SET', KEYS[1], ARGV[1], 'NX', 'PX', ARGV[2]) then return {1, ARGV[1], tonumber(ARGV[2])} end
return {0, redis.call('GET', KEYS[1]), redis.call('PTTL', KEYS[1])}
"""
# Keep: only while the key still holds our token (so nobody held it since), renew it for ARGV[2] ms,
# or with ARGV[2] = "0" release it. Replies 1 if it was ours, 0 if not.
KEEP_LEASE_SCRIPT = """
if redis.call('GET', KEYS[1]) ~= ARGV[1] then return 0 end
if ARGV[2] == '0' then redis.call('DEL', KEYS[1]) else redis.call('PEXPIRE', KEYS[1], ARGV[2]) end
return 1
"""


class StoreError(Exception):
    """The store cannot do what was asked; the message says what to check."""


class LeaseLost(StoreError):
    """This coordinator may no longer hold its job's lease: it must not write (another may be active)."""


class StoreUnavailable(StoreError):
    """Redis cannot be reached or refuses us (down, wrong URL, wrong credentials)."""


class StoreUnreachable(StoreUnavailable):
    """Nothing answered at the address (a server down, starting or loading, or a network fault):
    worth waiting for, unlike refused credentials or a certificate that does not verify."""


class HeadMismatch(StoreError):
    """A job's head record and its stream disagree (damage or a hand edit); the message names both
    and what the operator can do. Never worth retrying: nothing changes by waiting."""


def acl_rules(role: str, job: str | None = None) -> str:
    """The `ACL SETUSER` rules (after `NAME on >PASSWORD`) of a least-privilege user for `role`.

    "coordinator": read and write one job's keys (`job` required); "auditor": read-only, the keys of
    `job`, or of every job when None (status, ledger export and audit from Redis).
    """
    if role == "coordinator":
        if job is None:
            raise ValueError("a coordinator user is for one job: give its id")
        keys, commands = f"~swarmtune:{{{entries.check_job_id(job)}}}:*", COORDINATOR_COMMANDS
    elif role == "auditor":
        pattern = "*" if job is None else f"{{{entries.check_job_id(job)}}}:*"
        keys, commands = f"%R~swarmtune:{pattern}", AUDITOR_COMMANDS
    else:
        raise ValueError(f"unknown role {role!r}: coordinator or auditor")
    return " ".join(["resetkeys", "resetchannels", keys, "-@all", *(f"+{command}" for command in commands)])


class AppendStatus(enum.Enum):
    APPENDED = "appended"  # the entry is now the head
    DUPLICATE = "duplicate"  # the same bytes were already at that index: nothing to do
    TAKEN = "taken"  # other bytes hold that index: another writer won this slot
    STALE = "stale"  # the index is next, but prev_hash is not the head: built on an old head
    GAP = "gap"  # the index is beyond the next one
    FENCED = "fenced"  # the writer's lease token is not the job's lease holder: nothing written


@dataclass(frozen=True)
class AppendResult:
    status: AppendStatus
    head: Head | None  # the job's head after the attempt

    @property
    def ok(self) -> bool:
        """True when the entry is in the ledger (appended now or before)."""
        return self.status in (AppendStatus.APPENDED, AppendStatus.DUPLICATE)


def redact(url: str) -> str:
    """The URL without its password (in the user part or a `password=` parameter), for messages."""
    parts = urlsplit(url)
    query = parse_qsl(parts.query, keep_blank_values=True)
    if any(name in ("password", "ssl_password") for name, _ in query):
        masked = [(name, "***" if name in ("password", "ssl_password") else value) for name, value in query]
        parts = parts._replace(query=urlencode(masked, safe="/:"))
    if parts.password is not None:
        user = parts.username or ""
        host = parts.hostname or ""
        netloc = f"{user}:***@{host}" + (f":{parts.port}" if parts.port else "")
        parts = parts._replace(netloc=netloc)
    return urlunsplit(parts)


def _permission_problem(url: str, exc: Exception) -> StoreError:
    user = urlsplit(url).username or "default"
    return StoreError(
        f"Redis at {redact(url)} refused user {user!r} ({exc}); give that user the ACL rules of its role "
        "(docs/REDIS.md: a coordinator's user reads and writes its job's keys; an auditor's user only reads)"
    )


def _auth_problem(url: str, exc: Exception) -> StoreUnavailable:
    where = redact(url)
    if urlsplit(url).password is None:
        return StoreUnavailable(f"Redis at {where} needs credentials ({exc}); put user:password@ in the URL")
    return StoreUnavailable(f"Redis at {where} refused our credentials ({exc}); check the user and password in the URL")


@contextmanager
def _translated(url: str) -> Iterator[None]:
    """Turn redis-py errors into store errors that say what to check."""
    where = redact(url)
    try:
        yield
    except redis.AuthenticationError as exc:
        raise _auth_problem(url, exc) from None
    except redis.exceptions.NoPermissionError as exc:
        raise _permission_problem(url, exc) from None
    except (redis.ConnectionError, redis.TimeoutError) as exc:
        if "CERTIFICATE_VERIFY_FAILED" in str(exc) or "doesn't match" in str(exc):
            raise StoreUnavailable(
                f"the TLS certificate of Redis at {where} does not verify ({exc}); trust its CA with "
                "?ssl_ca_certs=/path/ca.pem in the rediss:// URL, and connect by a name or address the "
                "certificate lists"
            ) from None
        raise StoreUnreachable(
            f"cannot reach Redis at {where} ({exc}); check that the server is running and the URL "
            "(host and port, or socket path; rediss:// for TLS)"
        ) from None
    except redis.ResponseError as exc:
        if str(exc).startswith(("NOAUTH", "WRONGPASS")):
            raise _auth_problem(url, exc) from None
        if "NOPERM" in str(exc):  # from inside the append script the reply is "ERR ... NOPERM ..."
            raise _permission_problem(url, exc) from None
        raise StoreError(
            f"Redis at {where} refused a command ({exc}); "
            "check that the server is Redis >= 6.2 and that the swarmtune:* keys are swarmtune's"
        ) from None


@dataclass(frozen=True)
class LeaseState:
    """A reply of `take_lease`: taken by us, or who holds the lease and for how long (-1: no expiry)."""

    taken: bool
    holder: str | None  # None: it lapsed just now
    remaining_ms: int


def _no_fence() -> None:
    return None


def lease_taken_message(job: str) -> str:
    return (
        f"Redis refused a write to job {job!r}: its lease no longer names this coordinator (another one took "
        "over while this process was paused or cut off), so this one writes nothing more and stops; restart it to stand by"
    )


def _head_from_reply(index: object, head_hash: object) -> Head | None:
    number = int(index)  # type: ignore[call-overload]
    return None if number < 0 else Head(number, bytes(head_hash))  # type: ignore[arg-type]


class LedgerStore:
    """Ledger entries and open-iteration state of every job in one Redis database."""

    def __init__(self, client: redis.Redis, url: str) -> None:
        self._client = client
        self._url = url
        self._append = client.register_script(APPEND_SCRIPT)
        self._open_write = client.register_script(OPEN_WRITE_SCRIPT)
        self._take_lease = client.register_script(TAKE_LEASE_SCRIPT)
        self._keep_lease = client.register_script(KEEP_LEASE_SCRIPT)
        # Called before every write to a job (append, open state): raises to refuse it (see `fenced`).
        self._fence: Callable[[], None] = _no_fence
        self._lease_token: str | None = None  # set on a fenced store: Redis checks it in every write script
        self._repair_head = client.register_script(REPAIR_HEAD_SCRIPT)

    @property
    def url(self) -> str:
        return self._url

    def close(self) -> None:
        self._client.close()

    def __enter__(self) -> LedgerStore:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def append(self, stored: bytes, *, close_open: bool = False) -> AppendResult:
        """Append an entry iff it extends the job's head; with `close_open`, drop the open state too.

        Re-appending the same bytes at the same index answers DUPLICATE, so retries are safe.
        """
        self._fence()
        header = entries.read_header(stored)
        job = entries.check_job_id(header.job_id)
        keys = [LEDGER_KEY.format(job=job), HEAD_KEY.format(job=job), OPEN_KEY.format(job=job)]
        argv = [str(header.index), header.prev_hash, header.hash, stored, "1" if close_open else "0"]
        if self._lease_token is not None:
            keys.append(LEASE_KEY.format(job=job))
            argv.append(self._lease_token)
        with _translated(self._url):
            status, index, head_hash = self._append(keys=keys, args=argv)
        result = AppendResult(AppendStatus(status.decode()), _head_from_reply(index, head_hash))
        if result.status is AppendStatus.FENCED:
            raise LeaseLost(lease_taken_message(job))
        return result

    def head(self, job_id: str) -> Head | None:
        """The job's head record (None: no ledger); HeadMismatch if it is not one swarmtune wrote."""
        job = entries.check_job_id(job_id)
        with _translated(self._url):
            index, head_hash = self._client.hmget(HEAD_KEY.format(job=job), ["index", "hash"])
        if index is None and head_hash is None:
            return None
        if index is None or head_hash is None or not index.isdigit():
            raise HeadMismatch(f"the head record of job {job} is unreadable (index {index!r}); {head_advice(job)}")
        return Head(int(index), head_hash)

    def read(self, job_id: str, start: int = 0, stop: int | None = None) -> Iterator[bytes]:
        """Stored entries start..stop (inclusive; stop None: to the stream's end), in batches."""
        key = LEDGER_KEY.format(job=entries.check_job_id(job_id))
        high = "+" if stop is None else f"{stop}-1"
        yield from (stored for _, stored in self._entries(key, f"{start}-1", high))

    def _entries(self, key: str, low: str, high: str) -> Iterator[tuple[str, bytes]]:
        """(stream id, stored bytes) of the entries from `low` to `high` (XRANGE bounds), in batches."""
        while True:
            with _translated(self._url):
                batch = self._client.xrange(key, low, high, count=READ_BATCH)
            for entry_id, values in batch:
                yield entry_id.decode(), values[ENTRY_FIELD]
            if len(batch) < READ_BATCH:
                return
            low = "(" + batch[-1][0].decode()

    def read_to_end(self, job_id: str, check_head: bool = True) -> Iterator[bytes]:
        """Every stored entry to the stream's end (never stopping at the head record), each checked to
        have id `<index>-1`; then, with `check_head`, the head record checked against the last entry.
        HeadMismatch names what disagrees and what to do. Entries appended while reading are read too:
        an append moves stream and head at once, so a head beyond what was read means read on."""
        job = entries.check_job_id(job_id)
        key = LEDGER_KEY.format(job=job)
        count, last, low = 0, None, "-"
        while True:
            before = count
            for entry_id, stored in self._entries(key, low, "+"):
                problem = id_problem(job, entry_id, count)
                if problem:
                    raise HeadMismatch(problem)
                yield stored
                count, last, low = count + 1, stored, "(" + entry_id
            if not check_head:
                return
            head = self.head(job)
            if head is not None and head.index >= count > before:
                continue
            problem = head_problem(job, head, count, last)
            if problem:
                raise HeadMismatch(f"{problem}; {head_advice(job)}")
            return

    def repair_head(self, job_id: str, index: int, head_hash: bytes) -> bool:
        """Set the head record to entry `index` (its hash) iff that entry is the stream's last; False if
        the stream moved. For `swarmtune ledger repair-head`, after verifying the whole stream."""
        job = entries.check_job_id(job_id)
        self._fence()
        with _translated(self._url):
            done = self._repair_head(keys=[LEDGER_KEY.format(job=job), HEAD_KEY.format(job=job)], args=[f"{index}-1", index, head_hash])
        return bool(done)

    def jobs(self) -> list[str]:
        """Every job with at least one entry, sorted."""
        prefix, suffix = HEAD_PATTERN.split("*")
        with _translated(self._url):
            keys = [key.decode() for key in self._client.scan_iter(match=HEAD_PATTERN, count=1000)]
        return sorted(key[len(prefix) : -len(suffix)] for key in keys)

    def only_job(self) -> str:
        """The one job this database holds; StoreError naming the jobs if not exactly one."""
        jobs = self.jobs()
        if len(jobs) != 1:
            found = ", ".join(jobs) if jobs else "none"
            raise StoreError(f"{redact(self._url)} holds {len(jobs)} jobs ({found}); name one with --job")
        return jobs[0]

    def get_open(self, job_id: str) -> dict[bytes, bytes]:
        """The open-iteration state: opaque fields the coordinator owns ({} when none)."""
        with _translated(self._url):
            return self._client.hgetall(OPEN_KEY.format(job=entries.check_job_id(job_id)))

    def put_open(self, job_id: str, fields: Mapping[str | bytes, bytes]) -> None:
        """Set (add or overwrite) fields of the open-iteration state."""
        if fields:
            self._write_open(job_id, fields)

    def delete_open(self, job_id: str) -> None:
        self._write_open(job_id, None)

    def _write_open(self, job_id: str, fields: Mapping[str | bytes, bytes] | None) -> None:
        """HSET `fields` on the open state (None: DEL it); on a fenced store only while Redis still names
        this writer's token as the lease holder."""
        self._fence()
        job = entries.check_job_id(job_id)
        key = OPEN_KEY.format(job=job)
        with _translated(self._url):
            if self._lease_token is None:
                if fields is None:
                    self._client.delete(key)
                else:
                    self._client.hset(key, mapping=dict(fields))
                return
            change = ["del"] if fields is None else ["set", *(item for pair in fields.items() for item in pair)]
            written = self._open_write(keys=[key, LEASE_KEY.format(job=job)], args=[self._lease_token, *change])
        if not written:
            raise LeaseLost(lease_taken_message(job))

    def fenced(self, check: Callable[[], None], lease_token: str) -> LedgerStore:
        """This store (the same connections) for the holder of the lease `lease_token`: `check()` runs
        before every write to a job, and Redis refuses the write in the same script unless the lease
        still holds the token, so a writer stops the moment it may not hold the lease."""
        fenced = LedgerStore(self._client, self._url)
        fenced._fence = check
        fenced._lease_token = lease_token
        return fenced

    def take_lease(self, job_id: str, token: str, ttl_ms: int) -> LeaseState:
        """Hold the job's lease for `ttl_ms` if nobody does; otherwise who does."""
        key = LEASE_KEY.format(job=entries.check_job_id(job_id))
        with _translated(self._url):
            taken, holder, remaining = self._take_lease(keys=[key], args=[token, ttl_ms])
        return LeaseState(bool(taken), holder.decode(errors="replace") if holder else None, int(remaining))

    def keep_lease(self, job_id: str, token: str, ttl_ms: int) -> bool:
        """Renew the lease for `ttl_ms` (0: release it) iff `token` still holds it; whether it did."""
        key = LEASE_KEY.format(job=entries.check_job_id(job_id))
        with _translated(self._url):
            return bool(self._keep_lease(keys=[key], args=[token, ttl_ms]))


def _check_tls_files(url: str) -> None:
    """Each file a rediss:// URL names (`?ssl_ca_certs=PATH`...) exists: say so now, not as errno 2."""
    for name, value in parse_qsl(urlsplit(url).query):
        if name in TLS_FILE_PARAMETERS and not os.path.exists(value):
            raise StoreUnavailable(f"{redact(url)}: {name}={value}: no such file; give the path of a PEM file")


def connect(url: str, timeout_s: float = 5.0) -> LedgerStore:
    """Open and check a store at a `redis://`, `rediss://` or `unix://` URL (user:password allowed).

    TLS (`rediss://`) verifies the server's certificate and host name; trust a private CA with
    `?ssl_ca_certs=/path/ca.pem`, and give a client certificate (mutual TLS) with
    `&ssl_certfile=...&ssl_keyfile=...` (redis-py's URL parameters).
    """
    scheme = urlsplit(url).scheme
    if scheme not in ("redis", "rediss", "unix"):
        raise StoreUnavailable(f"{redact(url)} is not a Redis URL; use redis://, rediss:// or unix://")
    _check_tls_files(url)
    # Few quick retries: a retried append is safe (DUPLICATE), and a dead server is reported fast.
    retry = Retry(ExponentialBackoff(cap=0.5, base=0.05), retries=2)
    # Host names are checked unless the URL says otherwise (redis-py 5 did not check by default).
    tls = {"ssl_check_hostname": True} if scheme == "rediss" else {}
    with _translated(url):
        try:
            client = redis.Redis.from_url(url, socket_connect_timeout=timeout_s, socket_timeout=30.0, retry=retry, **tls)
            client.ping()
        except (TypeError, ValueError) as exc:  # an unknown or malformed URL parameter
            raise StoreUnavailable(f"{redact(url)}: bad URL parameter ({exc}); see redis-py's URL options") from None
    return LedgerStore(client, url)
