"""``dprdm audit``: the empirical privacy audit (a lower bound on epsilon from real runs of the
production search and release code; :mod:`dprdm.privacy.audit`)."""

from __future__ import annotations

import json
from typing import Any

import numpy as np

from dprdm.index.search import search_array
from dprdm.privacy import Profile
from dprdm.privacy.audit import VARIANTS, audit_retrieval

from .args import CliError, non_negative_float, positive_int

__all__ = ["register"]


def _cmd_audit(args: Any) -> int:
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


def register(subparsers: Any) -> None:
    """Add ``dprdm audit`` (empirical lower bound on epsilon for a profile)."""
    p = subparsers.add_parser("audit", help="empirical privacy audit of the retrieval mechanism")
    p.add_argument("--k", type=positive_int("--k"), default=1)
    p.add_argument("--q", type=non_negative_float("--q"), default=1.0)
    p.add_argument("--sigma", type=non_negative_float("--sigma"), default=1.0)
    p.add_argument("--delta", type=non_negative_float("--delta"), default=1e-5)
    p.add_argument("--trials", type=positive_int("--trials"), default=20000, help="runs per dataset (>= 20)")
    p.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=VARIANTS)
    p.add_argument("--seed", type=int, default=0, help="seed of the audit's own runs (not a production release)")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=_cmd_audit)
