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
from dprdm.ledger.api import UnknownDomain
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


def _discrete_index(profiles: dict, path: str = PATH) -> dict:
    return {"path": path, "bundle": "hash-16", "profiles": profiles}  # the default noise: discrete


def _cli(capsys: pytest.CaptureFixture[str], *argv: str) -> dict:
    assert cli_main(["privacy", *argv, "--json"]) == 0
    return json.loads(capsys.readouterr().out)


@pytest.mark.parametrize("noise", ["float", "discrete"])
def test_live_server_admits_exactly_the_cli_t_max(tmp_path, capsys, monkeypatch, noise: str) -> None:
    """A PLD budget (the default for one mechanism, float or discrete noise) on a live server admits
    exactly what ``dprdm privacy max-queries`` reports (more than RDP), then
    PRIVACY_BUDGET_EXHAUSTED; a restart on the same ledger uses the stored plan and still refuses."""
    mech = ["--noise", "float"] if noise == "float" else ["--noise", "discrete", "--dimension", "16"]
    args = ["--sigma", "0.8", "--q", "0.5", "--k", "5", "--delta", repr(DELTA), "--epsilon", repr(EPS), *mech]
    report = _cli(capsys, "max-queries", *args)
    t_max = report["max_queries"]
    assert report["accountant"] == "pld" and 20 <= t_max <= 50 and report["max_queries_rdp"] < t_max
    index = _float_index({"default": LIVE}) if noise == "float" else _discrete_index({"default": LIVE})
    cfg = make_config(indexes={"faces": index}, budgets={"corpus-p": {"epsilon": EPS, "delta": DELTA}})
    path = tmp_path / "ledger.sqlite3"
    with ServerThread(cfg, ledger=SqliteLedger(path)) as srv, Client(srv.address, TENANT_TOKEN) as c:
        spent = [c.retrieve("faces", f"prompt {i}", profile="default").receipt.epsilon_spent for i in range(t_max)]
        with pytest.raises(DprdmError) as err:
            c.retrieve("faces", "one more", profile="default")
        assert err.value.code == grpc.StatusCode.RESOURCE_EXHAUSTED and err.value.reason == "PRIVACY_BUDGET_EXHAUSTED"
        info = c.budget("faces")
    assert spent == sorted(spent) and spent[-1] <= EPS and info.epsilon_spent == spent[-1]
    first = _cli(capsys, "epsilon", *[a for a in args if a not in ("--epsilon", repr(EPS))], "--queries", "1")
    assert first["accountant"] == "pld" and spent[0] >= first["epsilon"]
    monkeypatch.setattr(pld_mod, "_plan", lambda *a: pytest.fail("the ledger's stored plan must be used"))
    monkeypatch.setattr(pld_mod, "_max_queries", lambda *a: pytest.fail("the ledger's stored plan must be used"))
    with ServerThread(cfg, ledger=SqliteLedger(path)) as srv, Client(srv.address, TENANT_TOKEN) as c:
        with pytest.raises(DprdmError) as err:
            c.retrieve("faces", "after restart", profile="default")
        assert err.value.reason == "PRIVACY_BUDGET_EXHAUSTED"


def test_reference_profile_with_default_discrete_noise_admits_at_least_1400(tmp_path, capsys) -> None:
    """Issue 17's done-criterion: SPEC §4's reference profile (sigma 0.05, q 0.01, k 23, delta 2e-5,
    epsilon 9.44) on a private index with its DEFAULT noise (exact discrete Gaussian on the lattice, d
    512) and the default accountant: the live server admits exactly the CLI's T_max (>= 1,400; RDP:
    988), never more than the float-Gaussian PLD bound (1,455), then refuses."""
    ref = {"k": 23, "q": 0.01, "sigma": 0.05, "lambda": 1.0}
    args = ["--sigma", "0.05", "--q", "0.01", "--k", "23", "--delta", "2e-05", "--epsilon", "9.44"]
    report = _cli(capsys, "max-queries", *args)  # the CLI's default: discrete noise at d 512, PLD
    float_report = _cli(capsys, "max-queries", *args, "--noise", "float")
    assert report["noise"] == "discrete" and report["dimension"] == 512 and report["accountant"] == "pld"
    t_max = report["max_queries"]
    assert 1400 <= t_max <= float_report["max_queries"] == 1455 and report["max_queries_rdp"] == 988
    index = {"path": "fake:domain=corpus-p,n=300,dim=512,public=40000", "bundle": "hash-512", "profiles": {"ref": ref}}
    cfg = make_config(indexes={"faces": index}, budgets={"corpus-p": {"epsilon": 9.44, "delta": 2e-5}})
    with ServerThread(cfg, ledger=SqliteLedger(tmp_path / "ledger.sqlite3")) as srv, Client(srv.address, TENANT_TOKEN) as c:
        last = None
        for i in range(t_max):
            last = c.retrieve("faces", f"prompt {i}", profile="ref").receipt
        with pytest.raises(DprdmError) as err:
            c.retrieve("faces", "one more", profile="ref")
        assert err.value.reason == "PRIVACY_BUDGET_EXHAUSTED"
    assert last is not None and last.epsilon_spent <= 9.44


# -- configuration -----------------------------------------------------------------------------------


def _catalog(indexes: dict, budgets: dict, ledger=None):
    return build_catalog(make_config(indexes=indexes, budgets=budgets), ledger or MemoryLedger(), fake_loaders())


def test_defaults_pld_for_one_mechanism_with_one_rule_line(caplog) -> None:
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
    with caplog.at_level(logging.DEBUG, logger="dprdm.server"):
        cat = _catalog({"faces": _discrete_index({"default": LIVE})}, {"corpus-p": {"epsilon": EPS, "delta": DELTA}})
    discrete = cat.budgets["corpus-p"]
    assert discrete.accountant == "pld" and discrete.hardened_dimension == 16
    assert 20 <= discrete.pld.max_queries <= budget.pld.max_queries  # the lattice costs a little
    line = cat.rules["corpus-p"]
    assert line.startswith(f"single profile, PLD: at most {discrete.pld.max_queries} queries of profile") and "\n" not in line
    assert [r.getMessage() for r in caplog.records if "corpus-p" in r.getMessage()] == [f"privacy domain 'corpus-p': {line}"]
    tiny = dict(LIVE, sigma=2.0**-21)  # below one lattice step: no pair, RDP with the reason
    cat = _catalog({"faces": _discrete_index({"default": tiny})}, {"corpus-p": {"epsilon": EPS, "delta": DELTA}})
    assert cat.budgets["corpus-p"].accountant == "rdp"
    assert "RDP" in cat.rules["corpus-p"] and "not PLD: PLD for discrete lattice noise needs sigma >=" in cat.rules["corpus-p"]


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


def test_pld_refused_below_one_lattice_step_and_on_several_mechanisms() -> None:
    tiny = {"faces": _discrete_index({"default": dict(LIVE, sigma=2.0**-21)})}
    with pytest.raises(StartupError, match=r"^budgets.corpus-p: accountant = \"pld\" is refused for .*discrete noise "
                                           r"at dimension 16: PLD for discrete lattice noise needs sigma >= .* use "
                                           r"accountant = \"rdp\"$"):
        _catalog(tiny, {"corpus-p": {"epsilon": EPS, "accountant": "pld"}})
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


class _RacingLedger(MemoryLedger):
    """A ledger where another replica creates the domain's budget between our read and our create."""

    def __init__(self, other: Budget) -> None:
        super().__init__()
        self._other: Budget | None = other

    def budget_state(self, domain: str):  # type: ignore[override]
        if self._other is not None:
            super().create_budget(domain, self._other)
            self._other = None
            raise UnknownDomain(domain)
        return super().budget_state(domain)


def test_two_replicas_creating_the_same_budget_at_once_both_start() -> None:
    """Two servers starting on one fresh ledger: the loser of the create race (DomainExists) serves
    the winner's budget when it is the one its configuration describes, and refuses a different one."""
    indexes = {"faces": _discrete_index({"default": LIVE})}
    budgets = {"corpus-p": {"epsilon": EPS, "delta": DELTA}}
    winner = _catalog(indexes, budgets).budgets["corpus-p"]
    cat = _catalog(indexes, budgets, _RacingLedger(winner))
    assert cat.budgets["corpus-p"].pld.max_queries == winner.pld.max_queries
    other = Budget.single(EPS / 2, DELTA, Profile.from_dict(LIVE), hardened_dimension=16, accountant="pld")
    with pytest.raises(StartupError, match="the ledger already holds a different budget"):
        _catalog(indexes, budgets, _RacingLedger(other))
