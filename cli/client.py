"""``dprdm retrieve | generate | budget | admin``: the command-line client of a dprdm server.

The address and token come from ``--address``/``--token`` or ``DPRDM_ADDRESS``/``DPRDM_TOKEN``
(TLS: ``--ca-cert`` or ``DPRDM_CA_CERT``, mTLS: ``--client-cert``/``--client-key``).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from .args import CliError, int_at_least

__all__ = ["register"]


def _connection_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("connection")
    g.add_argument("--address", help="HOST:PORT of the server (default $DPRDM_ADDRESS or 127.0.0.1:50051)")
    g.add_argument("--token", help="bearer token (default $DPRDM_TOKEN)")
    g.add_argument("--ca-cert", help="CA certificate: use TLS (default $DPRDM_CA_CERT)")
    g.add_argument("--client-cert", help="client certificate for mTLS")
    g.add_argument("--client-key", help="client key for mTLS")
    g.add_argument("--server-name", help="TLS name to verify instead of the address's host")
    g.add_argument("--timeout", type=float, default=300.0, help="seconds (default 300)")
    p.add_argument("--json", action="store_true", help="print JSON")


def _client(args: argparse.Namespace) -> Any:
    from dprdm.clients.client import Client

    try:
        c = Client(
            args.address,
            args.token,
            timeout=args.timeout,
            ca_cert=args.ca_cert,
            client_cert=args.client_cert,
            client_key=args.client_key,
            server_name=args.server_name,
        )
    except OSError as exc:
        raise CliError(f"cannot read TLS file {exc.filename!r}: {exc.strerror}") from None
    if not c.settings.token:
        c.close()
        raise CliError("no token: pass --token or set DPRDM_TOKEN")
    return c


def _dict(msg: Any) -> dict[str, Any]:
    from google.protobuf.json_format import MessageToDict

    return MessageToDict(msg, preserving_proto_field_name=True, always_print_fields_with_no_presence=True)


def _print(args: argparse.Namespace, data: Any, text: str) -> None:
    print(json.dumps(data, indent=2, sort_keys=True) if args.json else text)


def _receipt_text(r: Any) -> str:
    if not r.spend_id:
        return f"charged epsilon 0 (profile {r.profile!r}: nothing private was used)"
    how = " (replayed: no new charge)" if r.replayed else " (reused: charged 0)" if r.reused else ""
    return (
        f"spend {r.spend_id}{how}: profile {r.profile!r} on domain {r.domain!r}, epsilon charged "
        f"{r.epsilon_charged:.4g} at delta {r.delta:.3g}; spent {r.epsilon_spent:.4g} of "
        f"{r.epsilon_budget:.4g}, left {r.epsilon_left:.4g}"
    )


def _guard(fn: Any) -> Any:
    def run(args: argparse.Namespace) -> int:
        from dprdm.clients.client import DprdmError

        try:
            return int(fn(args) or 0)
        except DprdmError as exc:
            raise CliError(f"{exc.code.name}: {exc.message}") from None

    return run


@_guard
def _retrieve(args: argparse.Namespace) -> int:
    with _client(args) as c:
        res = c.retrieve(args.index, args.prompt, profile=args.profile, request_id=args.request_id)
    if args.out:
        import numpy as np

        np.save(args.out, res.embedding)
    data = {"embedding": res.embedding.tolist(), "receipt": _dict(res.receipt)}
    head = ", ".join(f"{x:.4f}" for x in res.embedding[:4])
    _print(args, data, f"embedding (d={res.embedding.size}): [{head}, ...]\n{_receipt_text(res.receipt)}")
    return 0


def _progress(event: Any) -> None:
    kind = event.WhichOneof("event")
    if kind == "queued":
        print(f"queued (position {event.queued.position})", file=sys.stderr)
    elif kind == "retrieved":
        print(_receipt_text(event.retrieved.receipt), file=sys.stderr)
    elif kind == "progress":
        p = event.progress
        width = 30
        done = int(width * p.step / max(1, p.total_steps))
        end = "\n" if p.step >= p.total_steps else ""
        print(
            f"\rdenoising [{'#' * done}{'.' * (width - done)}] {p.step}/{p.total_steps}",
            end=end,
            file=sys.stderr,
            flush=True,
        )


@_guard
def _generate(args: argparse.Namespace) -> int:
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    with _client(args) as c:
        res = c.generate(
            args.index,
            args.prompt,
            profile=args.profile,
            num_images=args.num_images,
            steps=args.steps,
            seed=args.seed,
            request_id=args.request_id,
            on_event=None if args.json else _progress,
        )
    stem = res.receipt.request_id if res.receipt is not None and res.receipt.request_id else "image"
    paths = []
    for i, png in enumerate(res.images):
        path = out / f"{stem}-{i}.png"
        path.write_bytes(png)
        paths.append(str(path))
    data = {"images": paths, "seed": res.seed, "receipt": _dict(res.receipt) if res.receipt else None}
    text = "\n".join([*paths, f"seed {res.seed}", _receipt_text(res.receipt) if res.receipt else ""])
    _print(args, data, text)
    return 0


def _budget_text(b: Any) -> str:
    rule = f"Rényi filter at order {b.filter_order:g}" if b.rule == "renyi_filter" else "single profile"
    lines = [
        f"domain {b.domain}: epsilon {b.epsilon_spent:.4g} spent of {b.epsilon:.4g} (left {b.epsilon_left:.4g}) "
        f"at delta {b.delta:.3g}; {rule}; neighbouring: {b.neighbouring}"
    ]
    if b.HasField("quota"):
        q = b.quota
        lines.append(f"  your quota ({q.tenant}): {q.epsilon_spent:.4g} spent of {q.epsilon_quota:.4g}")
    return "\n".join(lines)


@_guard
def _budget(args: argparse.Namespace) -> int:
    with _client(args) as c:
        if args.index or args.domain:
            budgets = [c.budget(args.index, domain=args.domain)]
        else:
            seen: dict[str, Any] = {}
            for info in c.list_indexes():
                if info.HasField("budget"):
                    seen.setdefault(info.budget.domain, info.budget)
            budgets = list(seen.values())
    _print(args, [_dict(b) for b in budgets], "\n".join(_budget_text(b) for b in budgets) or "no budgets")
    return 0


def _parse_profile(text: str) -> dict[str, float]:
    try:
        k, q, sigma, lam = text.split(",")
        return {"k": int(k), "q": float(q), "sigma": float(sigma), "lambda": float(lam)}
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected K,Q,SIGMA,LAMBDA; found {text!r}") from None


def _parse_quota(text: str) -> tuple[str, float]:
    tenant, sep, eps = text.partition("=")
    try:
        if not sep:
            raise ValueError
        return tenant, float(eps)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected TENANT=EPSILON; found {text!r}") from None


@_guard
def _admin(args: argparse.Namespace) -> int:
    with _client(args) as c:
        if args.admin_command == "create-budget":
            b = c.create_budget(
                args.domain,
                args.epsilon,
                args.delta,
                args.profile,
                renyi_filter=args.filter,
                filter_order=args.filter_order,
                quotas=dict(args.quota or []),
            )
            _print(args, _dict(b), _budget_text(b))
        elif args.admin_command == "audit-trail":
            spends = c.audit_trail(args.domain, limit=args.limit, offset=args.offset)
            rows = [
                f"{s.spend_id} {s.status:8} tenant={s.tenant} request={s.request_id} "
                f"eps={s.epsilon_charged:.4g} k={s.profile.k} q={s.profile.q:g} sigma={s.profile.sigma:g} "
                f"lambda={getattr(s.profile, 'lambda'):g}"
                for s in spends
            ]
            _print(args, [_dict(s) for s in spends], "\n".join(rows) or "no spends")
        elif args.admin_command == "counts":
            r = c.counts(args.domain)
            text = [f"domain {r.domain}: {r.spends} spends", _budget_text(r.budget)]
            text += [
                f"  index {i.name} ({i.version}): exact size {i.exact_size}, public size {i.public_size}"
                for i in r.indexes
            ]
            _print(args, _dict(r), "\n".join(text))
        else:
            quotas = c.quotas(args.domain)
            rows = [f"{q.tenant}: {q.epsilon_spent:.4g} spent of {q.epsilon_quota:.4g}" for q in quotas]
            _print(args, [_dict(q) for q in quotas], "\n".join(rows) or "no quotas")
    return 0


def _query_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("prompt", help="the public text prompt")
    p.add_argument("--index", required=True, help="index name (see `dprdm budget`)")
    p.add_argument("--profile", default="default", help="profile name (default 'default')")
    p.add_argument("--request-id", help="idempotency key: retrying with it never charges twice")
    _connection_args(p)


def register(subparsers: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    """Add ``retrieve``, ``generate``, ``budget`` and ``admin``."""
    p = subparsers.add_parser("retrieve", help="ask the server for a private conditioning vector")
    _query_args(p)
    p.add_argument("--out", help="save the embedding as .npy")
    p.set_defaults(func=_retrieve)

    p = subparsers.add_parser("generate", help="generate images from a prompt")
    _query_args(p)
    p.add_argument("--out", required=True, help="directory for the PNG images")
    p.add_argument("-n", "--num-images", type=int_at_least("--num-images", 0), default=1)
    p.add_argument("--steps", type=int_at_least("--steps", 0), default=0, help="denoising steps (0: the server's default)")
    p.add_argument("--seed", type=int_at_least("--seed", 0), help="sampler seed (never DP randomness)")
    p.set_defaults(func=_generate)

    p = subparsers.add_parser("budget", help="show a privacy budget")
    p.add_argument("--index", help="the index whose domain budget to show")
    p.add_argument("--domain", help="a privacy domain")
    _connection_args(p)
    p.set_defaults(func=_budget)

    p = subparsers.add_parser("admin", help="administer budgets and read the audit trail")
    sub = p.add_subparsers(dest="admin_command", metavar="ACTION", required=True)
    cb = sub.add_parser("create-budget", help="create a privacy domain's budget")
    cb.add_argument("domain")
    cb.add_argument("--epsilon", type=float, required=True)
    cb.add_argument("--delta", type=float, required=True)
    cb.add_argument(
        "--profile",
        type=_parse_profile,
        action="append",
        required=True,
        metavar="K,Q,SIGMA,LAMBDA",
        help="a profile the budget serves (repeat for several: Rényi filter)",
    )
    cb.add_argument("--filter", action="store_true", help="use a Rényi filter even for one profile")
    cb.add_argument(
        "--filter-order", type=float, help="the filter order a* (default: chosen from the profiles)"
    )
    cb.add_argument("--quota", type=_parse_quota, action="append", metavar="TENANT=EPSILON")
    audit = sub.add_parser("audit-trail", help="the audit trail of spends (spend by spend)")
    audit.add_argument("domain")
    audit.add_argument("--limit", type=int, default=100)
    audit.add_argument("--offset", type=int, default=0)
    sub.add_parser("counts", help="exact counts (operator-only)").add_argument("domain")
    sub.add_parser("quotas", help="tenants' quotas").add_argument("domain")
    for action in sub.choices.values():
        _connection_args(action)
    p.set_defaults(func=_admin)
