"""Validation of every request field: INVALID_ARGUMENT (or NOT_FOUND) naming the field, nothing charged."""

from __future__ import annotations

import grpc
import pytest
from google.rpc import error_details_pb2

from dprdm.clients.client import DprdmError
from dprdm.ledger import SqliteLedger
from dprdm.proto.v1 import admin_pb2, admin_pb2_grpc, dprdm_pb2, dprdm_pb2_grpc
from dprdm.server.testing import ADMIN_TOKEN, TENANT_TOKEN, ServerThread, make_config

INVALID, NOT_FOUND = grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.NOT_FOUND
GOOD = {"index": "faces", "profile": "default", "prompt": "a cat", "request_id": ""}


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    ledger = SqliteLedger(tmp_path_factory.mktemp("validation") / "ledger.sqlite3")
    cfg = make_config(limits={"max_prompt_chars": 50, "max_images": 3, "max_steps": 10, "default_steps": 2})
    with ServerThread(cfg, ledger=ledger) as srv:
        yield srv


def _call(method, request, token=TENANT_TOKEN):
    try:
        result = method(request, metadata=(("authorization", f"Bearer {token}"),), timeout=30)
        return list(result) if hasattr(result, "__iter__") and not hasattr(result, "ListFields") else result
    except grpc.RpcError as err:
        raise DprdmError.from_rpc(err) from None


def _expect(method, request, code, field, token=TENANT_TOKEN):
    with pytest.raises(DprdmError) as err:
        _call(method, request, token)
    assert err.value.code == code, err.value
    assert err.value.metadata.get("field") == field, err.value
    assert "Traceback" not in err.value.message
    if code == INVALID:
        (bad,) = [d for d in err.value.details if isinstance(d, error_details_pb2.BadRequest)]
        assert bad.field_violations[0].field == field


def _spent(channel):
    stub = dprdm_pb2_grpc.DprdmStub(channel)
    return _call(stub.GetBudget, dprdm_pb2.GetBudgetRequest(index="faces")).budget.epsilon_spent


QUERY_CASES = [
    ({"index": ""}, INVALID, "index"),
    ({"index": "x" * 129}, INVALID, "index"),
    ({"index": "bad name!"}, INVALID, "index"),
    ({"index": "nope"}, NOT_FOUND, "index"),
    ({"profile": ""}, INVALID, "profile"),
    ({"profile": "-leading-dash"}, INVALID, "profile"),
    ({"profile": "nope"}, NOT_FOUND, "profile"),
    ({"prompt": ""}, INVALID, "prompt"),
    ({"prompt": "   \n "}, INVALID, "prompt"),
    ({"prompt": "x" * 51}, INVALID, "prompt"),
    ({"prompt": "nul \x00 byte"}, INVALID, "prompt"),
    ({"prompt": "escape \x1b[31m"}, INVALID, "prompt"),
    ({"request_id": "has space"}, INVALID, "request_id"),
    ({"request_id": "r" * 129}, INVALID, "request_id"),
    ({"request_id": "ümlaut"}, INVALID, "request_id"),
]


@pytest.mark.parametrize(("change", "code", "field"), QUERY_CASES)
def test_retrieve_fields(channel, change, code, field):
    before = _spent(channel)
    _expect(
        dprdm_pb2_grpc.DprdmStub(channel).Retrieve,
        dprdm_pb2.RetrieveRequest(**{**GOOD, **change}),
        code,
        field,
    )
    assert _spent(channel) == before


GENERATE_CASES = [
    *QUERY_CASES,
    ({"num_images": 4}, INVALID, "num_images"),
    ({"num_images": 10**9}, INVALID, "num_images"),
    ({"steps": 11}, INVALID, "steps"),
    ({"steps": 2**32 - 1}, INVALID, "steps"),
]


@pytest.mark.parametrize(("change", "code", "field"), GENERATE_CASES)
def test_generate_fields(channel, change, code, field):
    before = _spent(channel)
    req = dprdm_pb2.GenerateRequest(**{**GOOD, **change})
    _expect(dprdm_pb2_grpc.DprdmStub(channel).Generate, req, code, field)
    assert _spent(channel) == before


def test_generate_bounds_accepted(channel):
    req = dprdm_pb2.GenerateRequest(**GOOD, num_images=3, steps=10, seed=2**64 - 1)
    events = _call(dprdm_pb2_grpc.DprdmStub(channel).Generate, req)
    assert events[-1].done.seed == 2**64 - 1 and events[-1].done.num_images == 3
    defaults = _call(dprdm_pb2_grpc.DprdmStub(channel).Generate, dprdm_pb2.GenerateRequest(**GOOD))
    assert sum(e.HasField("progress") for e in defaults) == 2 and defaults[-1].done.num_images == 1


@pytest.mark.parametrize(
    ("request_kwargs", "code", "field"),
    [
        ({}, INVALID, "domain"),
        ({"index": ""}, INVALID, "index"),
        ({"index": "nope"}, NOT_FOUND, "index"),
        ({"domain": "no-such-domain"}, NOT_FOUND, "domain"),
        ({"domain": "bad domain"}, INVALID, "domain"),
    ],
)
def test_get_budget_fields(channel, request_kwargs, code, field):
    _expect(
        dprdm_pb2_grpc.DprdmStub(channel).GetBudget, dprdm_pb2.GetBudgetRequest(**request_kwargs), code, field
    )


PROFILE = {"k": 4, "q": 0.1, "sigma": 1.0, "lambda": 0.5}


def _create(**kw):
    base = {
        "domain": "corpus-v",
        "epsilon": 1.0,
        "delta": 1e-6,
        "profiles": [admin_pb2.ProfileParams(**PROFILE)],
    }
    return admin_pb2.CreateBudgetRequest(**{**base, **kw})


def _params(**kw):
    return [admin_pb2.ProfileParams(**{**PROFILE, **kw})]


@pytest.mark.parametrize(
    ("request_", "field"),
    [
        (_create(domain=""), "domain"),
        (_create(domain="has space"), "domain"),
        (_create(epsilon=0.0), "epsilon"),
        (_create(epsilon=-1.0), "epsilon"),
        (_create(epsilon=float("inf")), "epsilon"),
        (_create(epsilon=float("nan")), "epsilon"),
        (_create(delta=0.0), "delta"),
        (_create(delta=0.9), "delta"),
        (_create(delta=float("nan")), "delta"),
        (_create(profiles=[]), "profiles"),
        (_create(profiles=_params(k=0)), "profiles[0]"),
        (_create(profiles=_params(q=1.5)), "profiles[0]"),
        (_create(profiles=_params(q=0.0)), "profiles[0]"),
        (_create(profiles=_params(sigma=0.0)), "profiles[0]"),
        (_create(profiles=_params(sigma=float("nan"))), "profiles[0]"),
        (_create(profiles=_params(**{"lambda": 1.5})), "profiles[0]"),
        (_create(profiles=_params(**{"lambda": 0.0})), "profiles"),
        (_create(tenant_quotas={"bad tenant": 1.0}), "tenant_quotas"),
        (_create(tenant_quotas={"alice": 0.0}), "tenant_quotas[alice]"),
        (_create(filter_order=3.3), "filter_order"),
        (_create(domain="corpus-a", delta=1e-2), "delta"),  # delta >= 1/N̄ of a served domain
    ],
)
def test_create_budget_fields(channel, request_, field):
    _expect(admin_pb2_grpc.AdminStub(channel).CreateBudget, request_, INVALID, field, ADMIN_TOKEN)


@pytest.mark.parametrize(
    ("method", "request_", "code", "field"),
    [
        ("GetAuditTrail", admin_pb2.GetAuditTrailRequest(domain=""), INVALID, "domain"),
        ("GetAuditTrail", admin_pb2.GetAuditTrailRequest(domain="corpus-a", limit=10_001), INVALID, "limit"),
        ("GetAuditTrail", admin_pb2.GetAuditTrailRequest(domain="corpus-a", offset=2**63), INVALID, "offset"),
        ("GetCounts", admin_pb2.GetCountsRequest(domain="bad domain"), INVALID, "domain"),
        ("ListQuotas", admin_pb2.ListQuotasRequest(domain=""), INVALID, "domain"),
    ],
)
def test_admin_read_fields(channel, method, request_, code, field):
    _expect(getattr(admin_pb2_grpc.AdminStub(channel), method), request_, code, field, ADMIN_TOKEN)


def test_unknown_domain_is_not_found_for_admin_reads(channel):
    for method, req in (
        ("GetAuditTrail", admin_pb2.GetAuditTrailRequest(domain="zzz")),
        ("GetCounts", admin_pb2.GetCountsRequest(domain="zzz")),
        ("ListQuotas", admin_pb2.ListQuotasRequest(domain="zzz")),
    ):
        with pytest.raises(DprdmError) as err:
            _call(getattr(admin_pb2_grpc.AdminStub(channel), method), req, ADMIN_TOKEN)
        assert err.value.code == NOT_FOUND and err.value.reason == "UNKNOWN_PRIVACY_DOMAIN"
