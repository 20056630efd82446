"""Server configuration: frozen, validated dataclasses loaded from TOML (``dprdm serve --config``).

Example (every key but ``[indexes.*]`` is optional; relative paths are relative to the file)::

    [server]
    listen = "127.0.0.1:50051"
    data_dir = "./data"              # the SQLite ledger lives here (ledger.sqlite3)
    metrics_port = 9095              # Prometheus; absent = off
    reuse_releases = true            # identical public input of a tenant answered "charged 0"
    generation_workers = 1
    generation_queue = 8
    # fixed_response_seconds = 0.5   # answer at a fixed time after admission (timing is a release)
    noise_pool_size = 2048           # discrete noise vectors kept ready per (sigma, dimension)
    noise_pool_threads = 1           # background refill threads (a drained pool answers UNAVAILABLE)
    shutdown_grace = 30.0            # SIGTERM/SIGINT: seconds admitted calls get to finish
    worker_start_timeout = 600.0     # --workers N: a worker not serving this long after its start is killed
    workers = 1                      # server processes on one port (SO_REUSEPORT); dprdm serve --workers
    log_format = "text"              # or "json" (one object per line); dprdm serve --log-format

    [ledger]                         # optional; absent: SQLite in data_dir (ledger.sqlite3)
    # url = "postgresql://dprdm@db.internal:5432/dprdm"   # several servers/hosts, one budget

    [limits]
    max_prompt_chars = 1000
    max_images = 4
    max_steps = 100
    default_steps = 25

    [tls]                            # optional; client_ca turns on mTLS
    cert = "server.pem"
    key = "server.key"
    client_ca = "ca.pem"

    [[tokens]]
    tenant = "alice"
    role = "tenant"                  # or "admin"
    token_env = "DPRDM_TOKEN_ALICE"  # or token = "..." or token_sha256 = "<hex>"
    # indexes = ["faces"]            # optional: only these indexes (or domains = ["corpus-id"])

    [indexes.faces]
    path = "/srv/faces-index"
    bundle = "dprdm-mini"            # encoder/generator bundle (must match the index's encoder)
    # noise = "discrete"             # discrete (default if private: floating-point-safe) | float
    # allow_float_noise = true       # required for noise = "float" on a private index (logged)
    # search_device = "auto"         # cpu | auto | cuda | cuda:N: where the private search runs
    # shards = ["10.0.0.5:50061", "10.0.0.6:50061"]   # path is a shard set served by `dprdm serve-shard`
    # shard_token_env = "DPRDM_SHARD_TOKEN"           # the shard servers' own token (never a tenant's)

    [indexes.faces.profiles.default]
    k = 18
    q = 0.01
    sigma = 0.2
    lambda = 0.5
    # nprobe = 8                     # IVF indexes: fixed per profile

    [budgets.faces-corpus]           # keyed by privacy domain (the manifests' corpus id)
    epsilon = 10.0
    delta = 1e-7                     # default 1/(10 N̄) of the largest served index
    rule = "auto"                    # auto | single | filter
    # accountant = "pld"             # single rule: pld | rdp (default: pld; multi-profile: rdp)
    quotas = { alice = 2.0 }

A budget here is created in the ledger if the domain has none; an existing ledger budget is
authoritative and must agree with the file.

Size (~500 lines, over the ~400 guideline): the schema's frozen dataclasses, the TOML walker and
the cross-section checks stay together so every error names its TOML key from one place and a
new key is added in one file; splitting types from parsing would put the validation that
``ServerConfig.with_overrides`` re-runs on the other side of an import cycle.
"""

from __future__ import annotations

import hashlib
import math
import os
import re
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from dprdm.privacy import Profile

__all__ = [
    "ConfigError",
    "ProfileConfig",
    "IndexConfig",
    "BudgetConfig",
    "LedgerConfig",
    "TokenConfig",
    "TlsConfig",
    "Limits",
    "ServerConfig",
    "load_config",
    "parse_config",
    "hash_token",
]

NOISE_KINDS = ("discrete", "float")
SEARCH_DEVICE_RE = re.compile(r"^(cpu|auto|cuda|cuda:\d+)$")
"""``[indexes.*] search_device`` values (``dprdm.index.device.SEARCH_DEVICES``)."""
"""``discrete``: the floating-point-safe exact discrete Gaussian on a lattice (default for private
indexes; ``dprdm.privacy.discrete``); ``float``: numpy's float Gaussian (default for public ones)."""

MAX_WORKERS = 128
"""Most server processes ``[server] workers`` may ask for."""
NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._:-]{0,127}$")
ROLES = ("tenant", "admin")


class ConfigError(ValueError):
    """An invalid configuration; the message names the key."""


def hash_token(token: str) -> str:
    """SHA-256 hex digest of a bearer token (only digests are kept in memory)."""
    return hashlib.sha256(token.encode("utf-8")).hexdigest()


@dataclass(frozen=True)
class ProfileConfig:
    """A named retrieval profile of an index."""

    name: str
    profile: Profile
    nprobe: int | None = None
    """IVF indexes only: lists probed per query, fixed per profile (public). Absent: the index's own default."""


@dataclass(frozen=True)
class IndexConfig:
    """One served index: where it is, which bundle encodes and generates for it, its profiles."""

    name: str
    path: str
    """The index directory (built by ``dprdm index build``)."""
    bundle: str
    """Encoder/generator bundle: a registry name (``dprdm-mini``) or a bundle file; its encoder must be
    the one that built the index (checked at start)."""
    profiles: tuple[ProfileConfig, ...]
    private: bool = True
    """Whether the corpus is private (charged to its domain's budget). ``false`` is refused for an index
    whose manifest declares a private corpus."""
    noise: str = "discrete"
    """``discrete`` (the exact discrete Gaussian; the default of a private index) or ``float`` (the
    default of a public one)."""
    allow_float_noise: bool = False
    """Explicit opt-in to float noise on a private index (``noise = "float"``): textbook
    floating-point Gaussian samples leak through their low-order bits (I. Mironov, "On
    Significance of the Least Significant Bits for Differential Privacy", CCS 2012), so a private
    index serves the exact discrete Gaussian unless the operator accepts that risk; the server
    logs a warning naming the index at every start."""
    search_device: str = "auto"
    """Where the private search runs: ``cpu`` (numpy), ``cuda`` / ``cuda:N`` (the stored rows live on
    that GPU; gather, exact float64 scores and top-k run there, the same bits as on the CPU; an error
    at start if the GPU, torch or the memory is missing), or ``auto`` (CUDA when torch sees a GPU and
    the index fits in half its free memory, else cpu). The start-up log says which was chosen."""
    shards: tuple[str, ...] | None = None
    """``HOST:PORT`` of the shard servers (``dprdm serve-shard``) of a shard set, in shard order
    (``shard-0000`` first): ``path`` is then the shard set directory, of which only ``shardset.json``
    is read, and each server's shard is checked against it at start. Absent: a ``path`` holding a
    shard set (``dprdm index split``) is searched in this process, its shards memory-mapped."""
    shard_token_env: str | None = None
    """With ``shards`` (required): the environment variable holding the shard servers' bearer token
    (>= 16 characters; it must differ from every ``[[tokens]]`` token: tenants never reach a shard)."""
    shard_tls_ca: str | None = None
    """With ``shards``: PEM CA bundle that signed the shard servers' certificates (TLS to them);
    absent: plaintext, for an operator-only network."""
    shard_tls_cert: str | None = None
    """With ``shard_tls_ca``: this server's client certificate (PEM) for mTLS to the shard servers."""
    shard_tls_key: str | None = None
    """The private key (PEM) of ``shard_tls_cert``."""
    shard_timeout: float = 30.0
    """With ``shards``: seconds a query waits for all its shard servers; a shard that fails or does not
    answer in time fails the query with ``UNAVAILABLE`` (after the charge: the charge is kept)."""

    def profile(self, name: str) -> Profile | None:
        """The profile called ``name``, or None."""
        return next((p.profile for p in self.profiles if p.name == name), None)


@dataclass(frozen=True)
class BudgetConfig:
    """A privacy domain's budget to create if the ledger has none."""

    domain: str
    epsilon: float
    """The domain's total epsilon (> 0); queries are refused once the next one would exceed it."""
    delta: float | None = None
    """The budget's delta, in (0, 1) and < 1/N̄ of every index of the domain; absent: 1/(10 N̄) of the
    largest served index."""
    rule: str = "auto"
    """``single`` (one mechanism: the exact RDP curve of n queries), ``filter`` (a Rényi filter at one
    order: mixes profiles and noise kinds) or ``auto`` (single when the domain serves one mechanism)."""
    filter_order: float | None = None
    """The Rényi filter's order; absent: the best order for the served mechanisms."""
    accountant: str | None = None
    """How a single-profile budget counts: ``pld`` (at most T_max queries by the privacy loss
    distribution, tighter; float and discrete lattice noise) or ``rdp`` (min over Rényi orders).
    Absent: ``pld`` where the mechanism has a pair (not: group size 2, sigma below one lattice step);
    an existing ledger budget keeps the accountant recorded when it was created. A Rényi filter is
    always ``rdp``."""
    quotas: tuple[tuple[str, float], ...] = ()
    """Per-tenant epsilon caps within the budget (``{ alice = 2.0 }``); a tenant over its cap is
    refused with ``TENANT_QUOTA_EXHAUSTED``."""


@dataclass(frozen=True)
class LedgerConfig:
    """Where the privacy ledger lives (``dprdm.ledger.open_ledger``)."""

    url: str | None = None
    """``postgresql://user@host:port/db`` (PostgreSQL: any number of servers and hosts spend one
    budget; the server creates and checks the tables at start; libpq parameters such as
    ``?sslmode=require`` or ``?options=-csearch_path%3Ddprdm`` are passed on; give a password by
    ``PGPASSWORD`` or ``~/.pgpass``, not in the file) or ``sqlite:///PATH`` (relative to this file;
    ``sqlite:////ABSOLUTE``); absent: SQLite in ``data_dir`` (``ledger.sqlite3``)."""


@dataclass(frozen=True)
class TokenConfig:
    """A bearer token (kept as its SHA-256) with its tenant and role.

    ``indexes`` / ``domains``: when set, a tenant token may use only those indexes (by name) or
    the indexes of those privacy domains (corpus ids); outside them: ``PERMISSION_DENIED``.
    None means every served index.
    """

    tenant: str
    """The tenant the token acts as (receipts, quotas and the audit trail name it)."""
    role: str
    """``tenant`` (queries) or ``admin`` (the admin service); default ``tenant``."""
    token_sha256: str = field(repr=False)
    indexes: frozenset[str] | None = None
    """Tenant tokens only: the index names this token may use (others: ``PERMISSION_DENIED``)."""
    domains: frozenset[str] | None = None
    """Tenant tokens only: the privacy domains (corpus ids) whose indexes this token may use."""


@dataclass(frozen=True)
class TlsConfig:
    """Server TLS; ``client_ca`` enables mTLS (client certificates required)."""

    cert: str
    """PEM certificate chain of the server."""
    key: str
    """PEM private key of the server."""
    client_ca: str | None = None
    """PEM CA bundle; set: clients must present a certificate it signed (mTLS)."""


@dataclass(frozen=True)
class Limits:
    """Request bounds (validation)."""

    max_prompt_chars: int = 1000
    """Longest prompt accepted (characters)."""
    max_images: int = 4
    """Most images one Generate call may ask for."""
    max_steps: int = 100
    """Most diffusion steps one Generate call may ask for."""
    default_steps: int = 25
    """Diffusion steps when a call names none (<= ``max_steps``)."""


@dataclass(frozen=True)
class ServerConfig:
    """The whole server configuration."""

    listen: str = "127.0.0.1:50051"
    """HOST:PORT of the gRPC server (port 0: any free port; ``--listen`` overrides)."""
    data_dir: str = "./dprdm-data"
    """Directory of the SQLite ledger (``ledger.sqlite3``) and the start-up caches (verified index
    checksums, discrete-noise RDP curves); created if missing. ``--data-dir`` overrides."""
    metrics_port: int | None = None
    """Prometheus metrics port; absent: no metrics endpoint. ``--metrics-port`` overrides."""
    metrics_host: str = "127.0.0.1"
    """Address the metrics endpoint binds."""
    reuse_releases: bool = True
    """Answer a tenant's repeated identical public input from its stored release, charged 0
    (``--no-reuse`` turns it off)."""
    group_commit: bool = True
    """Batch concurrent ledger commits into one fsync (each charge is still durable before it is
    answered)."""
    query_threads: int = 32
    """Threads running retrievals (search and release) off the event loop."""
    generation_workers: int = 1
    """Generations run at once (each holds the generator)."""
    generation_queue: int = 8
    """Generate calls that may wait for a worker; beyond it: ``UNAVAILABLE``/``OVERLOADED``, nothing charged."""
    min_deadline_seconds: float = 0.05
    """Calls whose deadline leaves less than this are refused before any charge
    (``DEADLINE_EXCEEDED``/``DEADLINE_TOO_SHORT``)."""
    fixed_response_seconds: float | None = None
    """Answer every spending call this long after admission (the response time is then independent
    of the private data); absent: as soon as ready."""
    max_message_bytes: int = 64 * 1024 * 1024
    """Largest gRPC message received or sent (>= 4 MiB)."""
    noise_pool_size: int = 2048
    """Exact discrete-Gaussian vectors pre-generated per served (sigma, dimension), filled before
    serving. Sized from ``benchmarks/noise.py`` (issue 12 item 11): the vectorised sampler refills
    ~4,000 vectors/s per core at d = 512, so 2,048 covers ~2 s of a 1,000 Retrieve/s burst (8 MB
    per key at d = 512; filling it delays start-up by ~0.5-1 s per key there); a drained pool
    answers UNAVAILABLE with RetryInfo, nothing charged."""
    noise_pool_threads: int = 1
    """Background threads refilling the discrete-noise pools."""
    shutdown_grace: float = 30.0
    """Seconds a SIGTERM/SIGINT drain lets admitted calls finish (new calls are refused at once);
    calls still running then are cut with ``UNAVAILABLE``/``SHUTTING_DOWN`` naming their request
    id (a charged one still stores its release before the process exits: a replay returns it)."""
    worker_start_timeout: float = 600.0
    """With ``workers`` > 1: seconds a worker process may take from its start to serving (loading
    models and indexes, filling the noise pools). Past it the supervisor kills the worker: at
    ``dprdm serve`` start-up that is a one-line error and exit status 2, later it is restarted with
    backoff like a worker that died."""
    log_format: str = "text"
    """``text`` or ``json`` (JSON lines): see :mod:`dprdm.server.logs`."""
    workers: int = 1
    """Server processes sharing ``listen`` (``--workers`` overrides). 1: one process, as always. N > 1:
    a supervisor (:mod:`dprdm.server.supervisor`) runs N worker processes, each a full server
    with its own gRPC server bound to the same port with ``SO_REUSEPORT`` (the kernel spreads
    connections over them), the same indexes (memory-mapped: the page cache holds one copy) and
    the same ledger; it restarts a worker that dies (with backoff) and forwards SIGTERM/SIGINT
    (drain) and SIGHUP (token reload). With ``metrics_port`` P > 0 worker i (0-based) serves its
    metrics on P + i; P = 0: each worker picks a free port (logged)."""
    limits: Limits = Limits()
    ledger: LedgerConfig = LedgerConfig()
    tls: TlsConfig | None = None
    tokens: tuple[TokenConfig, ...] = ()
    indexes: tuple[IndexConfig, ...] = ()
    budgets: tuple[BudgetConfig, ...] = ()

    def with_overrides(self, **changes: Any) -> ServerConfig:
        """A copy with ``changes`` applied (None values ignored), re-validated."""
        return _validate(replace(self, **{k: v for k, v in changes.items() if v is not None}))

    def budget_for(self, domain: str) -> BudgetConfig | None:
        """The configured budget of ``domain``, or None."""
        return next((b for b in self.budgets if b.domain == domain), None)


class _Table:
    """A TOML table with its key path, for error messages and unknown-key detection."""

    def __init__(self, data: Mapping[str, Any], path: str) -> None:
        if not isinstance(data, Mapping):
            raise ConfigError(f"{path}: must be a table")
        self.data, self.path, self.used = data, path, set[str]()

    def key(self, name: str) -> str:
        return f"{self.path}.{name}" if self.path else name

    def get(self, name: str, kind: type | tuple[type, ...], default: Any = None) -> Any:
        self.used.add(name)
        if name not in self.data:
            return default
        value = self.data[name]
        if kind is float and isinstance(value, int) and not isinstance(value, bool):
            value = float(value)
        if isinstance(value, bool) and kind is not bool:
            raise ConfigError(f"{self.key(name)}: must be {getattr(kind, '__name__', kind)}; found {value!r}")
        if not isinstance(value, kind):
            raise ConfigError(f"{self.key(name)}: must be {getattr(kind, '__name__', kind)}; found {value!r}")
        return value

    def require(self, name: str, kind: type | tuple[type, ...]) -> Any:
        if name not in self.data:
            raise ConfigError(f"{self.key(name)}: required")
        return self.get(name, kind)

    def sub(self, name: str) -> _Table:
        self.used.add(name)
        return _Table(self.data.get(name, {}), self.key(name))

    def done(self) -> None:
        unknown = sorted(set(self.data) - self.used)
        if unknown:
            raise ConfigError(f"{self.key(unknown[0])}: unknown key")


def _path(value: str | None, base: Path) -> str | None:
    if value is None:
        return None
    p = Path(value).expanduser()
    return str(p if p.is_absolute() else (base / p))


def _profiles(table: _Table, private: bool) -> tuple[ProfileConfig, ...]:
    out = []
    for name in table.data:
        _check_name(table.key(name), name)
        t = table.sub(name)
        try:
            prof = Profile(
                k=t.require("k", int),
                q=t.require("q", float),
                sigma=t.require("sigma", float),
                lam=t.require("lambda", float),
            )
            if private:
                prof.require_private_ok()
        except ConfigError:
            raise
        except ValueError as exc:
            raise ConfigError(f"{t.path}: {exc}") from None
        nprobe = t.get("nprobe", int)
        if nprobe is not None:
            _positive_int(t.key("nprobe"), nprobe)
        t.done()
        out.append(ProfileConfig(name=name, profile=prof, nprobe=nprobe))
    if not out:
        raise ConfigError(f"{table.path}: at least one profile is required")
    return tuple(out)


def _index(name: str, t: _Table, base: Path) -> IndexConfig:
    _check_name(t.path, name)
    private = t.get("private", bool, True)
    noise = t.get("noise", str, "discrete" if private else "float")
    if noise not in NOISE_KINDS:
        raise ConfigError(f"{t.key('noise')}: must be one of {', '.join(NOISE_KINDS)}; found {noise!r}")
    allow_float = t.get("allow_float_noise", bool, False)
    search_device = t.get("search_device", str, "auto")
    if not SEARCH_DEVICE_RE.match(search_device):
        raise ConfigError(f"{t.key('search_device')}: must be cpu, auto, cuda or cuda:N; found {search_device!r}")
    if private and noise == "float" and not allow_float:
        raise ConfigError(
            f"{t.key('noise')}: float noise on a private index leaks through floating-point "
            f"rounding (Mironov 2012); use noise = \"discrete\", or set allow_float_noise = true "
            f"to accept that risk explicitly"
        )
    idx = IndexConfig(
        name=name,
        path=str(_path(t.require("path", str), base)),
        bundle=t.require("bundle", str),
        profiles=_profiles(t.sub("profiles"), private),
        private=private,
        noise=noise,
        allow_float_noise=allow_float,
        search_device=search_device,
        **_shard_keys(t, base),
    )
    if noise == "discrete":
        for p in idx.profiles:
            if p.profile.retrieves and p.profile.sigma == 0.0:
                raise ConfigError(f"{t.key('noise')}: profile {p.name!r} has sigma = 0; use noise = \"float\"")
    t.done()
    return idx


def _shard_keys(t: _Table, base: Path) -> dict[str, Any]:
    """The ``shards`` / ``shard_*`` keys of an index (remote shard servers of a shard set)."""
    addresses = t.get("shards", list, [])
    for i, a in enumerate(addresses):
        host, sep, port = a.rpartition(":") if isinstance(a, str) else ("", "", "")
        if not sep or not host or not port.isdigit() or not 0 < int(port) <= 65535:
            raise ConfigError(f"{t.key('shards')}[{i}]: must be HOST:PORT; found {a!r}")
    if len(set(addresses)) != len(addresses):
        raise ConfigError(f"{t.key('shards')}: an address is listed twice (each shard has its own server)")
    keys: dict[str, Any] = {"shards": tuple(addresses) or None, "shard_token_env": t.get("shard_token_env", str),
                            "shard_timeout": t.get("shard_timeout", float, 30.0)}
    for k in ("shard_tls_ca", "shard_tls_cert", "shard_tls_key"):
        keys[k] = _path(t.get(k, str), base)
    given = [k for k in ("shard_token_env", "shard_tls_ca", "shard_tls_cert", "shard_tls_key") if keys[k]]
    if not addresses and given:
        raise ConfigError(f"{t.key(given[0])}: only with shards (the addresses of the shard servers)")
    if addresses and keys["shard_token_env"] is None:
        raise ConfigError(f"{t.key('shard_token_env')}: required with shards (the shard servers' own token)")
    if (keys["shard_tls_cert"] is None) != (keys["shard_tls_key"] is None) or (
            keys["shard_tls_cert"] and not keys["shard_tls_ca"]):
        raise ConfigError(f"{t.key('shard_tls_cert')}: mTLS needs shard_tls_cert, shard_tls_key and shard_tls_ca")
    if not 0.0 < keys["shard_timeout"] <= 600.0:
        raise ConfigError(f"{t.key('shard_timeout')}: must be in (0, 600] seconds; found {keys['shard_timeout']!r}")
    return keys


def _check_shard_tokens(cfg: ServerConfig, env: Mapping[str, str]) -> None:
    """Each index's shard token is set, long enough, and none of the ``[[tokens]]`` (tenants never
    hold a token a shard server accepts)."""
    digests = {tok.token_sha256 for tok in cfg.tokens}
    for idx in cfg.indexes:
        if idx.shard_token_env is None:
            continue
        key, raw = f"indexes.{idx.name}.shard_token_env", env.get(idx.shard_token_env)
        if raw is None or len(raw) < 16:
            raise ConfigError(f"{key}: environment variable {idx.shard_token_env} must hold a token of at "
                              f"least 16 characters")
        if hash_token(raw) in digests:
            raise ConfigError(f"{key}: the shard token equals a [[tokens]] token; shard servers need their own "
                              f"token (a tenant or admin token must never be accepted by a shard)")


def _budget(domain: str, t: _Table) -> BudgetConfig:
    _check_name(t.path, domain)
    quotas_t = t.sub("quotas")
    quotas = tuple((tenant, float(quotas_t.require(tenant, float))) for tenant in sorted(quotas_t.data))
    b = BudgetConfig(
        domain=domain,
        epsilon=t.require("epsilon", float),
        delta=t.get("delta", float),
        rule=t.get("rule", str, "auto"),
        filter_order=t.get("filter_order", float),
        accountant=t.get("accountant", str),
        quotas=quotas,
    )
    t.done()
    if not (b.epsilon > 0 and math.isfinite(b.epsilon)):
        raise ConfigError(f"{t.key('epsilon')}: must be finite and > 0; found {b.epsilon!r}")
    if b.delta is not None and not (0.0 < b.delta < 1.0):
        raise ConfigError(f"{t.key('delta')}: must be in (0, 1); found {b.delta!r}")
    if b.rule not in ("auto", "single", "filter"):
        raise ConfigError(f"{t.key('rule')}: must be auto, single or filter; found {b.rule!r}")
    if b.accountant is not None and b.accountant not in ("pld", "rdp"):
        raise ConfigError(f"{t.key('accountant')}: must be pld or rdp; found {b.accountant!r}")
    if b.accountant == "pld" and (b.rule == "filter" or b.filter_order is not None):
        raise ConfigError(f"{t.key('accountant')}: \"pld\" needs a single-profile budget; a Rényi filter "
                          f"(rule = \"filter\" or filter_order) is accounted by rdp")
    for tenant, eps in quotas:
        if not (eps > 0 and math.isfinite(eps)):
            raise ConfigError(f"{quotas_t.key(tenant)}: must be finite and > 0; found {eps!r}")
    return b


def _ledger(t: _Table, base: Path) -> LedgerConfig:
    from dprdm.ledger.factory import parse_ledger_url

    url = t.get("url", str)
    t.done()
    if url is None:
        return LedgerConfig()
    try:
        kind, where = parse_ledger_url(url)
    except ValueError as exc:
        raise ConfigError(f"{t.key('url')}: {exc}") from None
    if kind == "sqlite":  # relative to the configuration file, like every path
        url = "sqlite:///" + str(_path(where, base))
    return LedgerConfig(url=url)


def _token(i: int, t: _Table, env: Mapping[str, str]) -> TokenConfig:
    sources = [k for k in ("token", "token_env", "token_sha256") if k in t.data]
    if len(sources) != 1:
        raise ConfigError(f"{t.path}: exactly one of token, token_env, token_sha256 is required")
    tenant, role = t.require("tenant", str), t.get("role", str, "tenant")
    _check_name(t.key("tenant"), tenant)
    if role not in ROLES:
        raise ConfigError(f"{t.key('role')}: must be one of {', '.join(ROLES)}; found {role!r}")
    if sources[0] == "token_sha256":
        digest = t.get("token_sha256", str).lower()
        if not re.fullmatch(r"[0-9a-f]{64}", digest):
            raise ConfigError(f"{t.key('token_sha256')}: must be 64 hex digits")
    else:
        if sources[0] == "token":
            raw = t.get("token", str)
        else:
            var = t.get("token_env", str)
            if var not in env:
                raise ConfigError(f"{t.key('token_env')}: environment variable {var} is not set")
            raw = env[var]
        if len(raw) < 16:
            raise ConfigError(f"{t.key(sources[0])}: the token must have at least 16 characters")
        digest = hash_token(raw)
    scopes = {key: _name_list(t, key) for key in ("indexes", "domains")}
    if role == "admin" and any(v is not None for v in scopes.values()):
        key = "indexes" if scopes["indexes"] is not None else "domains"
        raise ConfigError(f"{t.key(key)}: only tenant tokens are limited to indexes or domains")
    t.done()
    return TokenConfig(tenant=tenant, role=role, token_sha256=digest, **scopes)


def _name_list(t: _Table, key: str) -> frozenset[str] | None:
    """An optional non-empty list of names (``indexes = ["a", "b"]``)."""
    values = t.get(key, list)
    if values is None:
        return None
    if not values:
        raise ConfigError(f"{t.key(key)}: must name at least one; remove the key to allow all")
    for v in values:
        if not isinstance(v, str):
            raise ConfigError(f"{t.key(key)}: expected names (strings); found {v!r}")
        _check_name(t.key(key), v)
    return frozenset(values)


def _check_name(key: str, name: str) -> None:
    if not NAME_RE.match(name):
        raise ConfigError(f"{key}: names must match {NAME_RE.pattern}; found {name!r}")


def _positive_int(key: str, value: int, low: int = 1) -> None:
    if value < low:
        raise ConfigError(f"{key}: must be >= {low}; found {value!r}")


def _validate(cfg: ServerConfig) -> ServerConfig:
    host, sep, port = cfg.listen.rpartition(":")
    if not sep or not host or not port.isdigit() or int(port) > 65535:
        raise ConfigError(f"server.listen: must be HOST:PORT; found {cfg.listen!r}")
    if cfg.metrics_port is not None and not (0 <= cfg.metrics_port <= 65535):
        raise ConfigError(f"server.metrics_port: must be in [0, 65535]; found {cfg.metrics_port!r}")
    for key in ("query_threads", "generation_workers", "generation_queue", "noise_pool_size", "noise_pool_threads"):
        _positive_int(f"server.{key}", getattr(cfg, key), 0 if key == "generation_queue" else 1)
    if cfg.noise_pool_size > 1_000_000:
        raise ConfigError(f"server.noise_pool_size: must be <= 1000000; found {cfg.noise_pool_size!r}")
    _positive_int("server.max_message_bytes", cfg.max_message_bytes, 4 * 1024 * 1024)
    fixed = cfg.fixed_response_seconds
    if fixed is not None and not (0.0 < fixed <= 600):
        raise ConfigError(f"server.fixed_response_seconds: must be in (0, 600]; found {fixed!r}")
    if cfg.log_format not in ("text", "json"):
        raise ConfigError(f"server.log_format: must be 'text' or 'json'; found {cfg.log_format!r}")
    if not (1 <= cfg.workers <= MAX_WORKERS):
        raise ConfigError(f"server.workers: must be in [1, {MAX_WORKERS}]; found {cfg.workers!r}")
    if cfg.workers > 1 and cfg.metrics_port and cfg.metrics_port + cfg.workers - 1 > 65535:
        raise ConfigError(f"server.metrics_port: {cfg.metrics_port} + {cfg.workers - 1} workers passes 65535")
    if not (1.0 <= cfg.worker_start_timeout <= 86400):
        raise ConfigError(
            f"server.worker_start_timeout: must be in [1, 86400] seconds; found {cfg.worker_start_timeout!r}"
        )
    if not (0.0 <= cfg.shutdown_grace <= 3600):
        raise ConfigError(f"server.shutdown_grace: must be in [0, 3600] seconds; found {cfg.shutdown_grace!r}")
    if not (0.0 <= cfg.min_deadline_seconds < 3600):
        raise ConfigError(
            f"server.min_deadline_seconds: must be in [0, 3600); found {cfg.min_deadline_seconds!r}"
        )
    lim = cfg.limits
    for key in ("max_prompt_chars", "max_images", "max_steps", "default_steps"):
        _positive_int(f"limits.{key}", getattr(lim, key))
    if lim.default_steps > lim.max_steps:
        raise ConfigError("limits.default_steps: must be <= limits.max_steps")
    digests = [t.token_sha256 for t in cfg.tokens]
    if len(set(digests)) != len(digests):
        raise ConfigError("tokens: the same token is configured twice")
    names = [i.name for i in cfg.indexes]
    if len(set(names)) != len(names):
        raise ConfigError("indexes: duplicate index name")
    for i, tok in enumerate(cfg.tokens):
        unknown = sorted((tok.indexes or frozenset()) - set(names))
        if unknown:
            raise ConfigError(f"tokens[{i}].indexes: no index named {unknown[0]!r} is configured")
    return cfg


def parse_config(
    data: Mapping[str, Any], *, base_dir: str | Path = ".", env: Mapping[str, str] | None = None
) -> ServerConfig:
    """Build a validated :class:`ServerConfig` from parsed TOML.

    Args:
        data: the TOML document as a dict.
        base_dir: directory relative paths are resolved against.
        env: environment for ``token_env`` (default ``os.environ``).

    Raises:
        ConfigError: naming the first bad key.
    """
    base = Path(base_dir)
    env = os.environ if env is None else env
    root = _Table(data, "")
    s, lim_t, tls_t = root.sub("server"), root.sub("limits"), root.sub("tls")
    ledger = _ledger(root.sub("ledger"), base)
    tls = None
    if tls_t.data:
        tls = TlsConfig(
            cert=str(_path(tls_t.require("cert", str), base)),
            key=str(_path(tls_t.require("key", str), base)),
            client_ca=_path(tls_t.get("client_ca", str), base),
        )
        tls_t.done()
    limits = Limits(**{k: lim_t.get(k, int, getattr(Limits(), k)) for k in Limits.__dataclass_fields__})
    lim_t.done()
    defaults = ServerConfig()
    simple = {
        k: s.get(k, type(getattr(defaults, k)), getattr(defaults, k))
        for k in (
            "listen",
            "metrics_host",
            "reuse_releases",
            "group_commit",
            "query_threads",
            "generation_workers",
            "generation_queue",
            "min_deadline_seconds",
            "max_message_bytes",
            "noise_pool_size",
            "noise_pool_threads",
            "shutdown_grace",
            "worker_start_timeout",
            "log_format",
            "workers",
        )
    }
    tokens_raw = root.get("tokens", list, [])
    idx_t, bud_t = root.sub("indexes"), root.sub("budgets")
    cfg = ServerConfig(
        **simple,
        data_dir=str(_path(s.get("data_dir", str, defaults.data_dir), base)),
        metrics_port=s.get("metrics_port", int),
        fixed_response_seconds=s.get("fixed_response_seconds", float),
        limits=limits,
        ledger=ledger,
        tls=tls,
        tokens=tuple(_token(i, _Table(t, f"tokens[{i}]"), env) for i, t in enumerate(tokens_raw)),
        indexes=tuple(_index(n, idx_t.sub(n), base) for n in idx_t.data),
        budgets=tuple(_budget(d, bud_t.sub(d)) for d in bud_t.data),
    )
    s.done()
    root.done()
    _check_shard_tokens(cfg, env)
    return _validate(cfg)


def load_config(path: str | Path, *, env: Mapping[str, str] | None = None) -> ServerConfig:
    """Read and validate a TOML configuration file.

    Raises:
        ConfigError: unreadable file, TOML syntax error, or a bad key (named).
    """
    p = Path(path)
    try:
        with p.open("rb") as fh:
            data = tomllib.load(fh)
    except OSError as exc:
        raise ConfigError(f"cannot read configuration {str(p)!r}: {exc.strerror}") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{p}: {exc}") from None
    return parse_config(data, base_dir=p.parent, env=env)
