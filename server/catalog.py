"""What the server serves: loaded indexes, their bundles and profiles, and the domains' budgets.

Built once at startup (:func:`build_catalog`); every check that can refuse to serve happens
here, before the port opens:

* the index's encoder identity equals the bundle's encoder identity (SPEC §8);
* every private index's privacy domain has a budget in the ledger, or the configuration creates
  one (SPEC §3: a private index whose ledger is missing is not served);
* an existing ledger budget agrees with the configuration (the ledger is authoritative);
* the budget can charge every profile served on the domain, and its delta is < 1/N̄ for every
  index of the domain;
* a single-profile budget's accountant (issue 17): ``pld`` by default where the mechanism has a
  PLD dominating pair (float or discrete noise; :func:`dprdm.privacy.pld.pld_dominating_pair`), else ``rdp``;
  an existing ledger budget keeps the accountant recorded at its creation; one line per domain
  names the rule (:attr:`Catalog.rules`, logged at DEBUG here: an INFO line before the port is
  bound would break the one-line start-up errors; the startup summary is the place to show it).
  A PLD budget in the ledger never serves a second mechanism: the
  server refuses to start, naming the budget (its spends are counted by PLD; continuing them under
  a Rényi filter needs a conversion of the stored budget the ledger does not offer).
"""

from __future__ import annotations

import functools
import logging
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import numpy as np
import numpy.typing as npt

from dprdm.ledger.api import DomainExists, Ledger, UnknownDomain
from dprdm.models.base import Encoder, EncoderIdentity, Generator
from dprdm.privacy import (
    DEFAULT_ORDERS,
    Budget,
    Profile,
    check_delta_for_size,
    default_delta,
    epsilon_from_rdp,
    mechanism_rdp,
)
from dprdm.privacy.budget import mechanism_text
from dprdm.privacy.pld import pld_dominating_pair, pld_refusal

from .config import BudgetConfig, IndexConfig, ServerConfig
from .curve_cache import CACHE_DIR as CURVE_CACHE_DIR
from .curve_cache import cached_charge
from .errors import StartupError

__all__ = [
    "RetrievalIndex",
    "Bundle",
    "Loaders",
    "ServedProfile",
    "ServedIndex",
    "Catalog",
    "build_catalog",
    "budget_from_config",
]


@runtime_checkable
class RetrievalIndex(Protocol):
    """The subset of a loaded ``dprdm.index`` index the server needs.

    Attributes:
        domain: privacy domain (the manifest's corpus id).
        version: index version (part of the idempotency binding).
        dimension: vector dimension.
        public_size: declared public size N̄ (clients see only this).
        exact_size: exact record count (operator-only).
        encoder: identity of the encoder that built the index.
        private: whether the manifest declares the corpus private.
    """

    domain: str
    version: str
    dimension: int
    public_size: int
    exact_size: int
    encoder: EncoderIdentity
    private: bool

    def search_subsampled(
        self,
        query: npt.NDArray[np.float32],
        *,
        k: int,
        q: float,
        rng: np.random.Generator,
        nprobe: int | None = None,
    ) -> npt.NDArray[np.floating[Any]]:
        """Top-k of an independent Poisson(q) subsample: the selected vectors, shape (m <= k, d)."""
        ...


@dataclass(frozen=True)
class Bundle:
    """An encoder and (optionally) a generator that were trained together."""

    name: str
    encoder: Encoder
    generator: Generator | None = None


@dataclass(frozen=True)
class Loaders:
    """Factories for indexes and bundles (the real ones by default; tests inject fakes)."""

    index: Callable[[str], RetrievalIndex]
    bundle: Callable[[str], Bundle]
    shards: Callable[[IndexConfig], RetrievalIndex] | None = None
    """Opens a shard set (``path`` holding ``shardset.json``, or ``shards`` configured); None: the real
    one, :func:`dprdm.server.shard_client.open_shards`."""


@dataclass(frozen=True)
class ServedProfile:
    """A profile with its precomputed charge (RDP curve) and one-query epsilon."""

    name: str
    profile: Profile
    charge: npt.NDArray[np.float64] = field(repr=False)
    epsilon_per_query: float
    nprobe: int | None = None
    hardened_dimension: int | None = None
    """Embedding dimension when releases use the exact discrete Gaussian (``noise = "discrete"``);
    the charge is then ``hardened_rdp`` at that dimension. None: float noise."""


@dataclass(frozen=True)
class ServedIndex:
    """One index as served: its configuration, loaded objects and profiles."""

    config: IndexConfig
    index: RetrievalIndex
    bundle: Bundle
    profiles: dict[str, ServedProfile]

    @property
    def name(self) -> str:
        """Index name (from the configuration)."""
        return self.config.name

    @property
    def domain(self) -> str:
        """Privacy domain (from the manifest)."""
        return self.index.domain


@dataclass(frozen=True)
class Catalog:
    """The served indexes by name and the budgets of their domains."""

    indexes: dict[str, ServedIndex]
    budgets: dict[str, Budget]
    rules: dict[str, str] = field(default_factory=dict)
    """Per domain with a budget, one line naming its admission rule and accountant (and why a
    single budget is not on PLD), e.g. ``single profile, PLD: at most 1455 queries of ...``."""

    def domains(self) -> list[str]:
        """Privacy domains with a served index, sorted."""
        return sorted({i.domain for i in self.indexes.values()})


_LOG = logging.getLogger("dprdm.server")


@dataclass(frozen=True)
class _Loaded:
    """An index and its bundle, loaded and checked, before its domain's budget is known."""

    config: IndexConfig
    index: RetrievalIndex
    bundle: Bundle
    hardened: int | None
    """Embedding dimension with discrete noise (``noise = "discrete"``), else None."""
    group: int = 1
    """The index's group size: 2 when one record can change two stored records (IVF lists with
    public capacities that may overflow; ``dprdm.index.ivf``), else 1. Charged by
    :func:`dprdm.privacy.group.group2_rdp`."""

    @property
    def name(self) -> str:
        return self.config.name

    @property
    def domain(self) -> str:
        return self.index.domain


def _epsilon_one(charge: npt.NDArray[np.float64], budget: Budget | None) -> float:
    """One query's epsilon at the budget's delta, by the budget's accountant (a PLD budget serves
    only this mechanism: its table at T = 1)."""
    if budget is None or not np.any(charge):
        return 0.0
    if budget.accountant == "pld":
        return float(budget.spent_epsilon(charge))
    return float(epsilon_from_rdp(charge, DEFAULT_ORDERS, budget.delta).epsilon)


Mechanism = tuple[Profile, int | None, int]
"""What one query's RDP curve depends on (SPEC §4): the profile, the noise (None: float Gaussian;
d: the exact discrete Gaussian at embedding dimension d) and the index's group size (1 or 2)."""


def budget_from_config(cfg: BudgetConfig, mechanisms: Sequence[Mechanism], public_size: int) -> Budget:
    """The :class:`Budget` a ``[budgets.<domain>]`` section describes.

    Args:
        cfg: the budget section.
        mechanisms: the distinct retrieving mechanisms (profile, noise) served on the domain; two
            indexes serving the same numbers with different noise kinds or dimensions are two.
        public_size: the largest N̄ of the domain's indexes (for the default delta).

    Raises:
        StartupError: naming the section.
    """
    key = f"budgets.{cfg.domain}"
    delta = cfg.delta if cfg.delta is not None else default_delta(public_size)
    rule = cfg.rule
    if rule == "auto":
        rule = "single" if len(mechanisms) == 1 and cfg.filter_order is None else "filter"
    try:
        if rule == "single":
            if len(mechanisms) != 1:
                served = "; ".join(mechanism_text(*m) for m in mechanisms)
                raise ValueError(
                    f"rule 'single' needs exactly one retrieving mechanism; the domain serves "
                    f"{len(mechanisms)} ({served}): use rule = \"filter\""
                )
            (profile, dim, group), = mechanisms
            return Budget.single(cfg.epsilon, delta, profile, hardened_dimension=dim, group_size=group,
                                 accountant=_accountant(cfg, profile, dim, group))
        if cfg.accountant == "pld":
            served = "; ".join(mechanism_text(*m) for m in mechanisms)
            raise ValueError(
                f"accountant = \"pld\" needs a single-profile budget; the domain serves {len(mechanisms)} "
                f"mechanisms ({served}), accounted by a Rényi filter: use accountant = \"rdp\""
            )
        return Budget.renyi_filter(
            cfg.epsilon,
            delta,
            [m[0] for m in mechanisms],
            order=cfg.filter_order,
            hardened_dimensions=[m[1] for m in mechanisms],
            group_sizes=[m[2] for m in mechanisms],
        )
    except ValueError as exc:
        raise StartupError(f"{key}: {exc}") from None


def _accountant(cfg: BudgetConfig, profile: Profile, dim: int | None, group: int) -> str:
    """A single budget's accountant: the configured one (``pld`` refused, with the reason, for a
    mechanism without a PLD pair), else ``pld`` where the mechanism has a pair, else ``rdp``."""
    if cfg.accountant == "pld" and pld_dominating_pair(profile, dim, group_size=group) is None:
        reason = pld_refusal(hardened_dimension=dim, group_size=group, profile=profile)
        raise ValueError(
            f"accountant = \"pld\" is refused for {mechanism_text(profile, dim, group)}: {reason}; "
            f"use accountant = \"rdp\""
        )
    if cfg.accountant is not None:
        return str(cfg.accountant)
    return "pld" if pld_dominating_pair(profile, dim, group_size=group) is not None else "rdp"


def _rule_line(budget: Budget, explicit: bool) -> str:
    """The startup line naming a domain's rule, and why a single budget is not on PLD."""
    line = budget.describe_rule()
    if budget.profile is None or budget.accountant == "pld":
        return line
    reason = pld_refusal(hardened_dimension=budget.hardened_dimension, group_size=budget.group_size,
                         profile=budget.profile)
    if reason is not None and budget.noise_recorded:
        return f"{line}; not PLD: {reason}"
    return f"{line}; {'as configured' if explicit else 'as recorded in the ledger'}"


def _pld_refuses_second(domain: str, stored: Budget, mechanisms: list[Mechanism]) -> None:
    """A PLD budget counts T-fold composition of ONE mechanism: refuse to serve any other."""
    if stored.accountant != "pld" or stored.profile is None:
        return
    own = (stored.profile, stored.hardened_dimension, stored.group_size)
    others = [m for m in mechanisms if m != own]
    if others:
        raise StartupError(
            f"privacy domain {domain!r}: its ledger budget is accounted by PLD (at most "
            f"{stored.pld.max_queries} queries of {mechanism_text(*own)}) and cannot serve another "
            f"mechanism ({'; '.join(mechanism_text(*m) for m in others)}): serve only that mechanism on "
            f"this domain (its spends are counted by PLD and are not moved to a Rényi filter)"
        )


def _same_budget(stored: Budget, wanted: Budget, accountant_set: bool = True) -> bool:
    """Whether the ledger's budget is the one the configuration describes (a stored single budget
    without a recorded noise kind matches on its profile; :func:`_domain_budget` then requires ONE
    mechanism to be served). The accountant must match only when the configuration names one."""
    same_noise = not stored.noise_recorded or (
        stored.hardened_dimension == wanted.hardened_dimension and stored.noise_recorded == wanted.noise_recorded
    )
    same_noise = same_noise and stored.group_size == wanted.group_size
    return (
        math.isclose(stored.epsilon, wanted.epsilon, rel_tol=1e-12)
        and math.isclose(stored.delta, wanted.delta, rel_tol=1e-12)
        and stored.profile == wanted.profile
        and stored.filter_order == wanted.filter_order
        and same_noise
        and (not accountant_set or stored.accountant == wanted.accountant)
    )


def _domain_budget(config: ServerConfig, ledger: Ledger, domain: str, served: list[_Loaded]) -> tuple[Budget, str]:
    mechanisms: list[Mechanism] = list(
        dict.fromkeys(
            (p.profile, s.hardened, s.group) for s in served for p in s.config.profiles if p.profile.retrieves
        )
    )
    cfg = config.budget_for(domain)
    wanted = None
    if cfg is not None and mechanisms:
        wanted = budget_from_config(cfg, mechanisms, max(s.index.public_size for s in served))
    try:
        budget = ledger.budget_state(domain).budget
    except UnknownDomain:
        if wanted is None:
            names = ", ".join(s.name for s in served)
            raise StartupError(
                f"privacy domain {domain!r} (index {names}) has no budget in the ledger; add a "
                f"[budgets.{domain}] section or create it with `dprdm admin create-budget`"
            ) from None
        try:
            ledger.create_budget(domain, wanted, tenant_quotas=dict(cfg.quotas) if cfg else None)
            budget = wanted
        except DomainExists:  # another replica created it since we looked: compare with it below
            budget = ledger.budget_state(domain).budget
    _pld_refuses_second(domain, budget, mechanisms)
    explicit = cfg is not None and cfg.accountant is not None
    if wanted is not None and not _same_budget(budget, wanted, explicit):
        raise StartupError(
            f"budgets.{domain}: the ledger already holds a different budget for this domain "
            f"({budget.summary()}); the ledger is authoritative: fix or remove the section"
        )
    rule = _rule_line(budget, explicit)
    _LOG.debug("privacy domain %r: %s", domain, rule)
    if budget.profile is not None and not budget.noise_recorded:
        if len(mechanisms) > 1:
            served_text = "; ".join(mechanism_text(*m) for m in mechanisms)
            raise StartupError(
                f"privacy domain {domain!r}: its single-profile budget (noise kind not recorded) may "
                f"serve ONE mechanism, but the domain serves {len(mechanisms)} ({served_text}): serve "
                f"one noise kind, or give the domain a Rényi-filter budget"
            )
        _LOG.info("privacy domain %r: single-profile budget without a recorded noise kind; it serves %s",
                  domain, mechanism_text(*mechanisms[0]) if mechanisms else "no retrieving profile")
    for s in served:
        try:
            check_delta_for_size(budget.delta, s.index.public_size)
            for p in s.config.profiles:
                if not budget.serves(p.profile, s.hardened, s.group):
                    raise ValueError(
                        f"the budget serves only {budget.describe_mechanism()}; profile {p.name!r} is "
                        f"{mechanism_text(p.profile, s.hardened, s.group)}: two mechanisms need a Rényi filter"
                    )
        except ValueError as exc:
            raise StartupError(f"indexes.{s.name}: budget of domain {domain!r}: {exc}") from None
    return budget, rule


@functools.lru_cache(maxsize=256)
def _charge(
    profile: Profile, hardened_dimension: int | None = None, group_size: int = 1, cache_dir: Path | None = None
) -> npt.NDArray[np.float64]:
    """The RDP curve of one query of a mechanism (computed once per distinct one; read-only).

    With ``cache_dir``, discrete-noise curves go through the disk cache of
    :mod:`dprdm.server.curve_cache` (bit-identical; saves ~1.3 s per mechanism at a restart)."""
    curve: npt.NDArray[np.float64]
    if cache_dir is not None and hardened_dimension is not None:
        curve = cached_charge(profile, orders=DEFAULT_ORDERS, hardened_dimension=hardened_dimension,
                              group_size=group_size, cache_dir=cache_dir)
    else:
        curve = mechanism_rdp(
            profile, orders=DEFAULT_ORDERS, hardened_dimension=hardened_dimension, group_size=group_size
        )
    curve.flags.writeable = False
    return curve


def _open_index(cfg: IndexConfig, loaders: Loaders) -> RetrievalIndex:
    """The index of ``cfg``: a shard set (local or on shard servers) or an ordinary index."""
    from dprdm.index.shardset import is_shard_set

    if cfg.shards or is_shard_set(cfg.path):
        from .shard_client import open_shards

        return (loaders.shards or open_shards)(cfg)
    return loaders.index(cfg.path)


def _load(cfg: IndexConfig, loaders: Loaders) -> _Loaded:
    try:
        index = _open_index(cfg, loaders)
    except (OSError, ValueError) as exc:
        raise StartupError(f"indexes.{cfg.name}: cannot load index at {cfg.path!r}: {exc}") from None
    try:
        bundle = loaders.bundle(cfg.bundle)
    except (OSError, ValueError, KeyError) as exc:
        raise StartupError(f"indexes.{cfg.name}: cannot load bundle {cfg.bundle!r}: {exc}") from None
    if bundle.encoder.identity != index.encoder:
        raise StartupError(
            f"indexes.{cfg.name}: the index was built with encoder {index.encoder.to_dict()} but bundle "
            f"{cfg.bundle!r} has encoder {bundle.encoder.identity.to_dict()}; refusing the mismatch"
        )
    if index.dimension != index.encoder.dimension:
        raise StartupError(f"indexes.{cfg.name}: index dimension {index.dimension} != encoder dimension")
    gen = bundle.generator
    if gen is not None and gen.conditioning_dimension != index.dimension:
        raise StartupError(
            f"indexes.{cfg.name}: generator conditioning dimension {gen.conditioning_dimension} "
            f"!= index dimension {index.dimension}"
        )
    if index.private and not cfg.private:
        raise StartupError(
            f"indexes.{cfg.name}: the index manifest declares a private corpus; private = false is refused"
        )
    if index.private and cfg.noise == "float":  # only with allow_float_noise = true (config check)
        _LOG.warning(
            "indexes.%s: private index served with FLOAT noise (allow_float_noise = true): "
            "floating-point Gaussian samples can leak through their low-order bits (Mironov 2012)",
            cfg.name,
        )
    group = int(getattr(index, "group_size", 1))
    if group not in (1, 2):
        raise StartupError(f"indexes.{cfg.name}: the index's group size must be 1 or 2; found {group!r}")
    _place_search(cfg, index)
    return _Loaded(cfg, index, bundle, index.dimension if cfg.noise == "discrete" else None, group)


def _place_search(cfg: IndexConfig, index: RetrievalIndex) -> None:
    """Choose where the index's private search runs (``search_device``; ``dprdm.index.device``).

    An index without a device backend (the in-memory test indexes) searches where it is: fine
    for ``cpu`` and ``auto``, refused for an explicit ``cuda``.
    """
    use = getattr(index, "use_search_device", None)
    if use is None:
        if cfg.search_device not in ("cpu", "auto"):
            raise StartupError(f"indexes.{cfg.name}.search_device: this index type has no device search; "
                               f"found {cfg.search_device!r}")
        return
    try:
        where = use(cfg.search_device)
    except (ValueError, ModuleNotFoundError) as exc:
        raise StartupError(f"indexes.{cfg.name}.search_device: {exc}") from None
    _LOG.info("indexes.%s: private search on %s", cfg.name, where)


def build_catalog(config: ServerConfig, ledger: Ledger, loaders: Loaders) -> Catalog:
    """Load every configured index and bundle and check the domains' budgets (creating those the
    configuration defines and the ledger lacks).

    Raises:
        StartupError: naming the index or section that cannot be served.
    """
    if not config.indexes:
        raise StartupError("indexes: no index is configured")
    served = [_load(c, loaders) for c in config.indexes]
    budgets: dict[str, Budget] = {}
    rules: dict[str, str] = {}
    for domain in sorted({s.domain for s in served}):
        members = [s for s in served if s.domain == domain]
        if not any(s.config.private for s in members) and config.budget_for(domain) is None:
            continue
        if any(p.profile.retrieves for s in members for p in s.config.profiles):
            budgets[domain], rules[domain] = _domain_budget(config, ledger, domain, members)
    final: dict[str, ServedIndex] = {}
    data_dir = Path(config.data_dir)  # curves are cached beside the ledger (only once it exists)
    cache_dir = data_dir / CURVE_CACHE_DIR if data_dir.is_dir() else None
    for s in served:
        budget = budgets.get(s.domain)
        profiles = {}
        for p in s.config.profiles:  # each served profile built once, with its final epsilon
            charge = _charge(p.profile, s.hardened, s.group, cache_dir)
            profiles[p.name] = ServedProfile(
                p.name, p.profile, charge, _epsilon_one(charge, budget), p.nprobe, s.hardened
            )
        final[s.name] = ServedIndex(config=s.config, index=s.index, bundle=s.bundle, profiles=profiles)
    return Catalog(indexes=final, budgets=budgets, rules=rules)
