"""``dprdm privacy``: epsilon of a profile, calibration, the maximum number of queries, and the
empirical privacy audit (a lower bound on epsilon from real runs of the production search and release).

Every number is the one the server charges: ``--noise discrete`` (the default, as private indexes are
served: exact discrete Gaussian on the lattice, curve ``discrete.hardened_rdp`` at ``--dimension``,
default 512) or ``--noise float``. Printed numbers are rounded in the safe direction (SPEC §4): sigma
and epsilon UP, q and queries DOWN, to 6 significant digits; ``--json`` keeps full precision.

Examples::

    dprdm privacy epsilon --sigma 0.2 --q 0.01 --k 18 --queries 1000 --delta 1e-7 [--json]
    dprdm privacy calibrate --epsilon 1 --delta 1e-7 --queries 1000 --q 0.01 --k 18   # -> sigma
    dprdm privacy max-queries --epsilon 1 --delta 1e-7 --sigma 0.2 --q 0.01 --k 18
    dprdm privacy audit --k 1 --q 1 --sigma 3                   # empirical lower bound on epsilon
"""

from __future__ import annotations

import argparse
import json
import math
from decimal import ROUND_CEILING, ROUND_FLOOR, Decimal
from typing import Any

import numpy as np

from dprdm.privacy.accountant import retrieval_rdp
from dprdm.privacy.calibration import calibrate_k, calibrate_q, calibrate_sigma, max_queries
from dprdm.privacy.conversion import epsilon_from_rdp
from dprdm.privacy.empirical_audit import VARIANTS, audit_retrieval
from dprdm.privacy.mechanism import Profile
from dprdm.privacy.orders import DEFAULT_ORDERS

from .args import CliError, non_negative_float, positive_int

__all__ = ["register"]


def _profile(args: argparse.Namespace) -> Profile:
    try:
        return Profile(k=args.k, q=args.q, sigma=args.sigma, lam=1.0)
    except ValueError as exc:
        raise CliError(str(exc)) from None


DEFAULT_DIMENSION = 512


def _hardened(args: argparse.Namespace) -> int | None:
    """The hardened dimension the server charges with: d for discrete noise, None for float."""
    return int(args.dimension) if args.noise == "discrete" else None


def _noise_doc(args: argparse.Namespace) -> dict[str, Any]:
    return {"noise": args.noise, "dimension": _hardened(args)}


def safe_round(value: float, *, up: bool, digits: int = 6) -> str:
    """``value`` to ``digits`` significant digits, rounded up (``up``) or down: the printed decimal,
    parsed back as a float, is >= (resp. <=) ``value`` (float parsing is monotone)."""
    if not math.isfinite(value) or value == 0.0:
        return repr(value)
    d = Decimal(repr(float(value)))
    step = Decimal(1).scaleb(d.adjusted() - digits + 1)
    return format(d.quantize(step, rounding=ROUND_CEILING if up else ROUND_FLOOR).normalize(), "f")


def _emit(args: argparse.Namespace, payload: dict[str, Any], text: str) -> int:
    print(json.dumps(payload) if args.json else text)
    return 0


def _cmd_epsilon(args: argparse.Namespace) -> int:
    profile = _profile(args)
    try:
        curve = retrieval_rdp(profile, orders=DEFAULT_ORDERS, hardened_dimension=_hardened(args)) * args.queries
        res = epsilon_from_rdp(curve, DEFAULT_ORDERS, args.delta)
    except ValueError as exc:
        raise CliError(str(exc)) from None
    payload = {
        "epsilon": res.epsilon,
        "order": res.order,
        "delta": args.delta,
        "queries": args.queries,
        "profile": profile.to_dict(),
        "noise_multiplier": profile.noise_multiplier,
        "neighbouring": "add/remove one record",
        **_noise_doc(args),
    }
    text = f"epsilon = {safe_round(res.epsilon, up=True)} at delta = {args.delta:g} (best order {res.order:g}, {args.noise} noise)"
    return _emit(args, payload, text)


def _cmd_calibrate(args: argparse.Namespace) -> int:
    given = {n for n in ("sigma", "q", "k") if getattr(args, n) is not None}
    if len(given) != 2:
        raise CliError(f"give exactly two of --sigma, --q, --k; found {sorted(given) or 'none'}")
    common = {"epsilon": args.epsilon, "delta": args.delta, "queries": args.queries}
    hard = _hardened(args)
    value: float
    try:
        if "sigma" not in given:
            name, value = "sigma", calibrate_sigma(k=args.k, q=args.q, hardened_dimension=hard, **common)
            shown = safe_round(value, up=True)  # a larger sigma still meets the target
        elif "k" not in given:
            name, value = "k", calibrate_k(sigma=args.sigma, q=args.q, hardened_dimension=hard, **common)
            shown = str(value)
        else:
            name, value = "q", calibrate_q(sigma=args.sigma, k=args.k, hardened_dimension=hard, **common)
            shown = safe_round(value, up=False)  # a smaller q still meets the target
    except ValueError as exc:
        raise CliError(str(exc)) from None
    return _emit(args, {name: value, **common, **_noise_doc(args)}, f"{name} = {shown} ({args.noise} noise)")


def _cmd_max_queries(args: argparse.Namespace) -> int:
    profile = _profile(args)
    try:
        t = max_queries(epsilon=args.epsilon, delta=args.delta, profile=profile, hardened_dimension=_hardened(args))
    except ValueError as exc:
        raise CliError(str(exc)) from None
    payload = {"max_queries": t, "epsilon": args.epsilon, "delta": args.delta, **_noise_doc(args)}
    return _emit(args, payload, f"max queries = {t} ({args.noise} noise)")


def _cmd_audit(args: argparse.Namespace) -> int:
    from dprdm.index.search import search_array  # the production search (needs the index's packages)

    results = []
    try:
        profile = Profile(k=args.k, q=args.q, sigma=args.sigma, lam=1.0)
        rng = np.random.default_rng(args.seed)
        for variant in args.variants:
            res = audit_retrieval(
                search_array, profile, variant=variant, trials=args.trials, delta=args.delta, rng=rng
            )
            results.append(res.to_dict())
            print(f"{variant:>22}: claimed {res.claimed_epsilon:.3f}, audited >= {res.audited_lower_bound:.3f} "
                  f"({res.trials} trials per dataset, ratio {res.ratio:.2f})")
    except ValueError as exc:
        raise CliError(str(exc)) from None
    if args.json:
        print(json.dumps(results))
    return 0


def _add_noise(p: argparse.ArgumentParser) -> None:
    p.add_argument("--noise", choices=("discrete", "float"), default="discrete",
                   help="the noise the index is served with: discrete (default; private indexes) or float")
    p.add_argument("--dimension", type=positive_int("--dimension"), default=DEFAULT_DIMENSION,
                   help=f"embedding dimension of the index (discrete noise; default {DEFAULT_DIMENSION}; "
                        "the lattice rounding widens the sensitivity by 2^-20 sqrt(d))")


def register(subparsers: Any) -> None:
    """Add ``privacy`` and its sub-commands to the ``dprdm`` parser."""
    parser = subparsers.add_parser("privacy", help="privacy accounting: epsilon, calibration, max queries, empirical audit")
    sub = parser.add_subparsers(dest="privacy_command", metavar="SUBCOMMAND", required=True)
    num, count = non_negative_float, positive_int

    p = sub.add_parser("epsilon", help="epsilon of T queries of a profile")
    p.add_argument("--sigma", type=num("--sigma"), required=True)
    p.add_argument("--q", type=num("--q"), required=True)
    p.add_argument("--k", type=count("--k"), required=True)
    p.add_argument("--queries", type=count("--queries"), required=True)
    p.add_argument("--delta", type=num("--delta"), required=True)
    _add_noise(p)
    p.add_argument("--json", action="store_true", help="print one JSON object (full precision)")
    p.set_defaults(func=_cmd_epsilon)

    p = sub.add_parser("calibrate", help="solve one of sigma, q, k for a target epsilon")
    p.add_argument("--epsilon", type=num("--epsilon"), required=True)
    p.add_argument("--delta", type=num("--delta"), required=True)
    p.add_argument("--queries", type=count("--queries"), required=True)
    p.add_argument("--sigma", type=num("--sigma"))
    p.add_argument("--q", type=num("--q"))
    p.add_argument("--k", type=count("--k"))
    _add_noise(p)
    p.add_argument("--json", action="store_true", help="print one JSON object (full precision)")
    p.set_defaults(func=_cmd_calibrate)

    p = sub.add_parser("max-queries", help="largest number of queries a profile admits")
    p.add_argument("--epsilon", type=num("--epsilon"), required=True)
    p.add_argument("--delta", type=num("--delta"), required=True)
    p.add_argument("--sigma", type=num("--sigma"), required=True)
    p.add_argument("--q", type=num("--q"), required=True)
    p.add_argument("--k", type=count("--k"), required=True)
    _add_noise(p)
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.set_defaults(func=_cmd_max_queries)

    p = sub.add_parser("audit", help="empirical privacy audit: a lower bound on epsilon from real runs")
    p.add_argument("--k", type=positive_int("--k"), default=1)
    p.add_argument("--q", type=non_negative_float("--q"), default=1.0)
    p.add_argument("--sigma", type=non_negative_float("--sigma"), default=1.0)
    p.add_argument("--delta", type=non_negative_float("--delta"), default=1e-5)
    p.add_argument("--trials", type=positive_int("--trials"), default=20000, help="runs per dataset (>= 20)")
    p.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=VARIANTS)
    p.add_argument("--seed", type=int, default=0, help="seed of the audit's own runs (not a production release)")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=_cmd_audit)
