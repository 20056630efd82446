"""``dprdm privacy``: epsilon of a profile, calibration, the maximum number of queries, and the
empirical privacy audit (a lower bound on epsilon from real runs of the production search and release).

Every number is the one the server charges: ``--noise discrete`` (the default, as private indexes are
served: exact discrete Gaussian on the lattice, curve ``discrete.hardened_rdp`` at ``--dimension``,
default 512) or ``--noise float``, and ``--accountant`` (issue 17): ``pld`` (privacy loss
distribution, ``dprdm.privacy.pld``; float or discrete noise) or ``rdp``; the default is what the
server uses for a single-profile budget of that mechanism: ``pld`` (``rdp`` only where there is no
pair: sigma below one lattice step). ``--json`` names the accountant; under PLD, calibrate and
max-queries also give the RDP value (``<name>_rdp``) for comparison. Printed numbers are rounded in
the safe direction (SPEC §4): sigma and epsilon UP, q and queries DOWN, to 6 significant digits;
``--json`` keeps full precision.

Examples::

    dprdm privacy epsilon --sigma 0.2 --q 0.01 --k 18 --queries 1000 --delta 1e-7 [--json]
    dprdm privacy calibrate --epsilon 1 --delta 1e-7 --queries 1000 --q 0.01 --k 18   # -> sigma
    dprdm privacy max-queries --epsilon 1 --delta 1e-7 --sigma 0.2 --q 0.01 --k 18
    dprdm privacy max-queries --epsilon 9.44 --delta 2e-5 --sigma 0.05 --q 0.01 --k 23  # discrete, PLD: 1453
    dprdm privacy max-queries --epsilon 9.44 --delta 2e-5 --sigma 0.05 --q 0.01 --k 23 --noise float  # PLD: 1455
    dprdm privacy audit --k 1 --q 1 --sigma 3                   # lower bound on epsilon (discrete release; --noise float)
"""

from __future__ import annotations

import argparse
import json
import math
from decimal import ROUND_CEILING, ROUND_FLOOR, Decimal
from typing import Any

import numpy as np

from dprdm.privacy.accountant import retrieval_rdp
from dprdm.privacy.calibration import calibrate_k, calibrate_q, calibrate_sigma, max_queries, meets_target
from dprdm.privacy.conversion import epsilon_from_rdp
from dprdm.privacy.empirical_audit import VARIANTS, audit_retrieval
from dprdm.privacy.mechanism import Profile
from dprdm.privacy.orders import DEFAULT_ORDERS
from dprdm.privacy.pld import epsilon_pld, max_queries_pld, pld_refusal

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


def _accountant(args: argparse.Namespace) -> str:
    """``--accountant``, or what the server uses for a single-profile budget of this mechanism."""
    profile = None
    if getattr(args, "sigma", None) is not None and getattr(args, "k", None) is not None and getattr(args, "q", None) is not None:
        profile = _profile(args)
    reason = pld_refusal(hardened_dimension=_hardened(args), profile=profile)
    if args.accountant is None:
        return "rdp" if reason is not None else "pld"
    if args.accountant == "pld" and reason is not None:
        raise CliError(f"--accountant pld: {reason}; use --accountant rdp")
    return str(args.accountant)


def _noise_doc(args: argparse.Namespace) -> dict[str, Any]:
    return {"noise": args.noise, "dimension": _hardened(args), "accountant": _accountant(args)}


def _label(args: argparse.Namespace) -> str:
    return f"{args.noise} noise, {_accountant(args).upper()}"


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
    accountant = _accountant(args)
    try:
        if accountant == "pld":
            eps, order = epsilon_pld(profile=profile, queries=args.queries, delta=args.delta,
                                     hardened_dimension=_hardened(args)), None
        else:
            curve = retrieval_rdp(profile, orders=DEFAULT_ORDERS, hardened_dimension=_hardened(args)) * args.queries
            res = epsilon_from_rdp(curve, DEFAULT_ORDERS, args.delta)
            eps, order = res.epsilon, res.order
    except ValueError as exc:
        raise CliError(str(exc)) from None
    payload = {
        "epsilon": eps,
        "order": order,
        "delta": args.delta,
        "queries": args.queries,
        "profile": profile.to_dict(),
        "noise_multiplier": profile.noise_multiplier,
        "neighbouring": "add/remove one record",
        **_noise_doc(args),
    }
    how = f"best order {order:g}, " if order is not None else ""
    text = f"epsilon = {safe_round(eps, up=True)} at delta = {args.delta:g} ({how}{_label(args)})"
    return _emit(args, payload, text)


def _cmd_calibrate(args: argparse.Namespace) -> int:
    given = {n for n in ("sigma", "q", "k") if getattr(args, n) is not None}
    if len(given) != 2:
        raise CliError(f"give exactly two of --sigma, --q, --k; found {sorted(given) or 'none'}")
    common = {"epsilon": args.epsilon, "delta": args.delta, "queries": args.queries}
    accountant = _accountant(args)
    name = next(n for n in ("sigma", "k", "q") if n not in given)
    try:
        value, shown = _solve(args, name, accountant, common)
        payload = {name: value, **common, **_noise_doc(args)}
        text = f"{name} = {shown} ({_label(args)})"
        if accountant == "pld":  # the RDP value beside it (a larger sigma or k, a smaller q)
            payload[f"{name}_rdp"], rdp_shown = _solve(args, name, "rdp", common)
            text += f"; RDP: {rdp_shown}"
    except ValueError as exc:
        raise CliError(str(exc)) from None
    return _emit(args, payload, text)


def _solve(args: argparse.Namespace, name: str, accountant: str, common: dict[str, Any]) -> tuple[float, str]:
    """(calibrated value, its safely rounded text) of ``name`` under ``accountant``."""
    hard = _hardened(args)
    if name == "sigma":
        sigma = calibrate_sigma(k=args.k, q=args.q, hardened_dimension=hard, accountant=accountant, **common)
        return sigma, _checked(safe_round(sigma, up=True), sigma, "sigma", args, accountant, common)
    if name == "k":
        k = calibrate_k(sigma=args.sigma, q=args.q, hardened_dimension=hard, accountant=accountant, **common)
        return k, str(k)
    q = calibrate_q(sigma=args.sigma, k=args.k, hardened_dimension=hard, accountant=accountant, **common)
    return q, _checked(safe_round(q, up=False), q, "q", args, accountant, common)


def _checked(shown: str, exact: float, name: str, args: argparse.Namespace, accountant: str,
             common: dict[str, Any]) -> str:
    """``shown`` (rounded in the safe direction) if it still meets the target, else the exact
    calibrated value in full: the discrete-noise bound is not monotone in sigma or q, so rounding
    "up" (sigma) or "down" (q) can cross a jump of the bound."""
    values = {"k": args.k, "q": args.q, "sigma": args.sigma, name: float(shown)}
    profile = Profile(k=values["k"], q=values["q"], sigma=values["sigma"], lam=1.0)
    if meets_target(profile, hardened_dimension=_hardened(args), accountant=accountant, **common):
        return shown
    return repr(exact)


def _cmd_max_queries(args: argparse.Namespace) -> int:
    profile = _profile(args)
    accountant = _accountant(args)
    common = {"epsilon": args.epsilon, "delta": args.delta, "profile": profile, "hardened_dimension": _hardened(args)}
    try:
        t = max_queries(**common) if accountant == "rdp" else max_queries_pld(**common)
        payload = {"max_queries": t, "epsilon": args.epsilon, "delta": args.delta, **_noise_doc(args)}
        if accountant == "pld":
            payload["max_queries_rdp"] = max_queries(**common)
    except ValueError as exc:
        raise CliError(str(exc)) from None
    return _emit(args, payload, f"max queries = {t} ({_label(args)})")


def _cmd_audit(args: argparse.Namespace) -> int:
    from dprdm.index.search import search_array  # the production search (needs the index's packages)

    results = []
    try:
        profile = Profile(k=args.k, q=args.q, sigma=args.sigma, lam=1.0)
        rng = np.random.default_rng(args.seed)
        hard = _hardened(args)  # the audited release's noise; the claims are for that mechanism
        for variant in args.variants:
            res = audit_retrieval(
                search_array, profile, variant=variant, trials=args.trials, delta=args.delta, rng=rng,
                noise=args.noise, dimension=args.dimension,
            )
            doc = res.to_dict()
            pld = ""
            if variant == "correct" and pld_refusal(hardened_dimension=hard, profile=profile) is None:
                # the PLD claim of one release of the audited mechanism (float, or the lattice at d)
                doc["claimed_epsilon_pld"] = epsilon_pld(profile=profile, queries=1, delta=args.delta,
                                                         hardened_dimension=hard)
                pld = f" (PLD {doc['claimed_epsilon_pld']:.3f})"
            results.append(doc)
            print(f"{variant:>22}: claimed {res.claimed_epsilon:.3f}{pld}, audited >= {res.audited_lower_bound:.3f} "
                  f"({res.trials} trials per dataset, ratio {res.ratio:.2f}, {args.noise} noise, d = {args.dimension})")
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
    p.add_argument("--accountant", choices=("pld", "rdp"), default=None,
                   help="pld (privacy loss distribution; float noise only) or rdp; default: what the server "
                        "uses for a single-profile budget (pld for float noise, rdp for discrete)")


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
    p.add_argument("--noise", choices=("discrete", "float"), default="discrete",
                   help="the audited release: discrete (default; the hardened lattice release private indexes "
                        "serve, claimed with the discrete curves) or float")
    p.add_argument("--dimension", type=positive_int("--dimension"), default=8,
                   help="dimension of the synthetic worst-case corpus (default 8; the statistic is the release "
                        "projected on the canary, so d only changes the lattice widening and the cost)")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=_cmd_audit)
