"""Issue 17 in the server: PLD budgets admit exactly the CLI's T_max on a live server, the config
rules (defaults, refusals), and the rule for a second profile added to a PLD budget later."""

from __future__ import annotations

import json
import logging

import grpc
import pytest

from dprdm.cli.main import main as cli_main
from dprdm.clients.client import Client, DprdmError
from dprdm.ledger import MemoryLedger, SqliteLedger
from dprdm.privacy import DEFAULT_ORDERS, Budget, Profile, mechanism_rdp
from dprdm.privacy import pld as pld_mod
from dprdm.server.catalog import build_catalog
from dprdm.server.config import ConfigError
from dprdm.server.errors import StartupError
from dprdm.server.testing import TENANT_TOKEN, ServerThread, fake_loaders, make_config

PATH = "fake:domain=corpus-p,n=60,dim=16,public=100"
LIVE = {"k": 5, "q": 0.5, "sigma": 0.8, "lambda": 0.5}
OTHER = {"k": 6, "q": 0.5, "sigma": 0.8, "lambda": 0.5}
EPS, DELTA = 7.0, 1e-5


def _float_index(profiles: dict, path: str = PATH) -> dict:
    return {"path": path, "bundle": "hash-16", "noise": "float", "allow_float_noise": True, "profiles": profiles}


def _cli(capsys: pytest.CaptureFixture[str], *argv: str) -> dict:
    assert cli_main(["privacy", *argv, "--json"]) == 0
    return json.loads(capsys.readouterr().out)


def test_live_server_admits_exactly_the_cli_t_max(tmp_path, capsys, monkeypatch) -> None:
    """A PLD budget (the default for float noise) on a float-noise index: the server admits exactly
    what ``dprdm privacy max-queries`` reports (more than RDP), then PRIVACY_BUDGET_EXHAUSTED; a
    restart on the same ledger uses the stored plan and still refuses."""
    args = ["--sigma", "0.8", "--q", "0.5", "--k", "5", "--delta", repr(DELTA), "--epsilon", repr(EPS), "--noise", "float"]
    report = _cli(capsys, "max-queries", *args)
    t_max = report["max_queries"]
    assert report["accountant"] == "pld" and 20 <= t_max <= 50 and report["max_queries_rdp"] < t_max
    cfg = make_config(indexes={"faces": _float_index({"default": LIVE})},
                      budgets={"corpus-p": {"epsilon": EPS, "delta": DELTA}})
    path = tmp_path / "ledger.sqlite3"
    with ServerThread(cfg, ledger=SqliteLedger(path)) as srv, Client(srv.address, TENANT_TOKEN) as c:
        spent = [c.retrieve("faces", f"prompt {i}", profile="default").receipt.epsilon_spent for i in range(t_max)]
        with pytest.raises(DprdmError) as err:
            c.retrieve("faces", "one more", profile="default")
        assert err.value.code == grpc.StatusCode.RESOURCE_EXHAUSTED and err.value.reason == "PRIVACY_BUDGET_EXHAUSTED"
        info = c.budget("faces")
    assert spent == sorted(spent) and spent[-1] <= EPS and info.epsilon_spent == spent[-1]
    first = _cli(capsys, "epsilon", *args[:-4], "--queries", "1", "--noise", "float")
    assert first["accountant"] == "pld" and spent[0] >= first["epsilon"]
    monkeypatch.setattr(pld_mod, "_plan", lambda *a: pytest.fail("the ledger's stored plan must be used"))
    monkeypatch.setattr(pld_mod, "_max_queries", lambda *a: pytest.fail("the ledger's stored plan must be used"))
    with ServerThread(cfg, ledger=SqliteLedger(path)) as srv, Client(srv.address, TENANT_TOKEN) as c:
        with pytest.raises(DprdmError) as err:
            c.retrieve("faces", "after restart", profile="default")
        assert err.value.reason == "PRIVACY_BUDGET_EXHAUSTED"


# -- configuration -----------------------------------------------------------------------------------


def _catalog(indexes: dict, budgets: dict, ledger=None):
    return build_catalog(make_config(indexes=indexes, budgets=budgets), ledger or MemoryLedger(), fake_loaders())


def test_defaults_pld_for_float_rdp_for_discrete_with_one_rule_line(caplog) -> None:
    """The catalog states each domain's rule in one line (``Catalog.rules``, for the startup
    summary; logged at DEBUG: nothing at INFO before the port is bound)."""
    with caplog.at_level(logging.INFO, logger="dprdm.server"):
        floaty = _catalog({"faces": _float_index({"default": LIVE})}, {"corpus-p": {"epsilon": EPS, "delta": DELTA}})
    assert not [r for r in caplog.records if "corpus-p" in r.getMessage()]
    budget = floaty.budgets["corpus-p"]
    assert budget.accountant == "pld" and budget.pld.max_queries >= 20
    line = floaty.rules["corpus-p"]
    assert line.startswith(f"single profile, PLD: at most {budget.pld.max_queries} queries of profile") and "\n" not in line
    served = floaty.indexes["faces"].profiles["default"]
    assert served.epsilon_per_query == budget.pld.epsilon_after(1)  # the table at T = 1, not RDP
    discrete = {"faces": {"path": PATH, "bundle": "hash-16", "profiles": {"default": LIVE}}}
    with caplog.at_level(logging.DEBUG, logger="dprdm.server"):
        cat = _catalog(discrete, {"corpus-p": {"epsilon": EPS, "delta": DELTA}})
    assert cat.budgets["corpus-p"].accountant == "rdp"
    line = cat.rules["corpus-p"]
    assert "RDP" in line and "not PLD: PLD is not proven for discrete lattice noise" in line
    assert [r.getMessage() for r in caplog.records if "corpus-p" in r.getMessage()] == [f"privacy domain 'corpus-p': {line}"]


@pytest.mark.parametrize(
    "budget,key,message",
    [
        ({"epsilon": 1.0, "accountant": "prv"}, "budgets.corpus-p.accountant", "must be pld or rdp; found 'prv'"),
        ({"epsilon": 1.0, "accountant": "pld", "rule": "filter"}, "budgets.corpus-p.accountant", "needs a single-profile"),
        ({"epsilon": 1.0, "accountant": 3}, "budgets.corpus-p.accountant", "must be str"),
    ],
)
def test_config_errors_name_the_key(budget: dict, key: str, message: str) -> None:
    with pytest.raises(ConfigError) as err:
        make_config(indexes={"faces": _float_index({"default": LIVE})}, budgets={"corpus-p": budget})
    text = str(err.value)
    assert text.startswith(key) and message in text and "\n" not in text


def test_pld_refused_on_discrete_noise_and_on_several_mechanisms() -> None:
    discrete = {"faces": {"path": PATH, "bundle": "hash-16", "profiles": {"default": LIVE}}}
    with pytest.raises(StartupError, match=r"^budgets.corpus-p: accountant = \"pld\" is refused for .*discrete noise "
                                           r"at dimension 16: PLD is not proven .* use accountant = \"rdp\"$"):
        _catalog(discrete, {"corpus-p": {"epsilon": EPS, "accountant": "pld"}})
    two = {"faces": _float_index({"a": LIVE, "b": OTHER})}
    with pytest.raises(StartupError, match=r"^budgets.corpus-p: accountant = \"pld\" needs a single-profile budget; "
                                           r"the domain serves 2 mechanisms .* use accountant = \"rdp\"$"):
        _catalog(two, {"corpus-p": {"epsilon": EPS, "accountant": "pld"}})
    assert _catalog(two, {"corpus-p": {"epsilon": EPS}}).budgets["corpus-p"].filter_order is not None  # default: filter


def test_an_existing_rdp_budget_keeps_its_accountant() -> None:
    """A budget stored before issue 17 (no accountant: RDP) is served as recorded when the file
    names no accountant; naming ``pld`` explicitly is a different budget: refused."""
    ledger = MemoryLedger()
    ledger.create_budget("corpus-p", Budget.single(EPS, DELTA, Profile.from_dict(LIVE)))
    indexes = {"faces": _float_index({"default": LIVE})}
    cat = _catalog(indexes, {"corpus-p": {"epsilon": EPS, "delta": DELTA}}, ledger)
    assert cat.budgets["corpus-p"].accountant == "rdp"
    assert "RDP" in cat.rules["corpus-p"] and cat.rules["corpus-p"].endswith("as recorded in the ledger")
    with pytest.raises(StartupError, match="the ledger already holds a different budget"):
        _catalog(indexes, {"corpus-p": {"epsilon": EPS, "delta": DELTA, "accountant": "pld"}}, ledger)


# -- a second profile added later --------------------------------------------------------------------


def test_a_second_mechanism_on_a_pld_budget_is_refused_at_startup(tmp_path) -> None:
    """Rule: a PLD budget counts T-fold composition of ONE mechanism; when the operator later serves
    a second mechanism on the domain the server refuses to start, in one line naming the domain,
    the budget's mechanism and T_max, and what to do; nothing in the ledger changes."""
    path = tmp_path / "ledger.sqlite3"
    ledger = SqliteLedger(path)
    cat = _catalog({"faces": _float_index({"default": LIVE})}, {"corpus-p": {"epsilon": EPS, "delta": DELTA}}, ledger)
    budget = cat.budgets["corpus-p"]
    charge = mechanism_rdp(Profile.from_dict(LIVE), orders=DEFAULT_ORDERS)
    for i in range(3):
        ledger.reserve(domain="corpus-p", tenant="t", request_id=f"r{i}", binding_hash=f"b{i}", profile={}, charge_rdp=charge)
    before = ledger.budget_state("corpus-p")
    added = {"faces": _float_index({"default": LIVE, "new": OTHER})}
    for budgets in ({"corpus-p": {"epsilon": EPS, "delta": DELTA}}, {}):  # with and without the section
        with pytest.raises(StartupError) as err:
            _catalog(added, budgets, ledger)
        text = str(err.value)
        assert "\n" not in text and text.startswith("privacy domain 'corpus-p': its ledger budget is accounted by PLD")
        assert f"at most {budget.pld.max_queries} queries" in text and "'k': 6" in text
        assert "serve only that mechanism on this domain" in text
    after = ledger.budget_state("corpus-p")
    assert after.spends == before.spends == 3 and after.budget.accountant == "pld"
    # the same mechanism on a second index, and a lambda = 0 profile, are still one mechanism
    more = {"faces": _float_index({"default": LIVE, "public": {**LIVE, "lambda": 0.0}}),
            "faces-2": _float_index({"default": LIVE})}
    assert _catalog(more, {}, ledger).budgets["corpus-p"].accountant == "pld"
    ledger.close()
