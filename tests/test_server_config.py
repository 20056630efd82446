"""Configuration (TOML -> frozen dataclasses) and the startup checks of the catalog."""

from __future__ import annotations

import dataclasses

import pytest

from dprdm.ledger import MemoryLedger
from dprdm.privacy import Budget, Profile
from dprdm.server.catalog import build_catalog
from dprdm.server.config import ConfigError, hash_token, load_config, parse_config
from dprdm.server.errors import StartupError
from dprdm.server.testing import fake_loaders, make_config

EXAMPLE = """
[server]
listen = "127.0.0.1:50051"
data_dir = "data"
metrics_port = 9095
reuse_releases = false

[limits]
max_prompt_chars = 500

[tls]
cert = "server.pem"
key = "server.key"
client_ca = "ca.pem"

[[tokens]]
tenant = "alice"
role = "tenant"
token_env = "ALICE_TOKEN"

[[tokens]]
tenant = "root"
role = "admin"
token_sha256 = "%s"

[indexes.faces]
path = "idx/faces"
bundle = "hash-16"

[indexes.faces.profiles.default]
k = 18
q = 0.01
sigma = 0.2
lambda = 0.5
nprobe = 4

[budgets.corpus-a]
epsilon = 10.0
delta = 1e-7
quotas = { alice = 2.0 }
""" % ("ab" * 32)


def test_example_loads(tmp_path):
    path = tmp_path / "server.toml"
    path.write_text(EXAMPLE)
    cfg = load_config(path, env={"ALICE_TOKEN": "a-long-enough-token"})
    assert cfg.listen == "127.0.0.1:50051" and cfg.metrics_port == 9095 and not cfg.reuse_releases
    assert cfg.data_dir == str(tmp_path / "data") and cfg.indexes[0].path == str(tmp_path / "idx/faces")
    assert cfg.tls is not None and cfg.tls.client_ca == str(tmp_path / "ca.pem")
    assert cfg.tokens[0].token_sha256 == hash_token("a-long-enough-token") and cfg.tokens[1].role == "admin"
    prof = cfg.indexes[0].profiles[0]
    assert prof.profile == Profile(k=18, q=0.01, sigma=0.2, lam=0.5) and prof.nprobe == 4
    assert cfg.budgets[0].quotas == (("alice", 2.0),) and cfg.limits.max_prompt_chars == 500
    assert "a-long-enough-token" not in repr(cfg)
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.listen = "x"  # type: ignore[misc]
    assert cfg.with_overrides(listen="0.0.0.0:1", data_dir=None).listen == "0.0.0.0:1"


def _doc(**changes):
    base = {
        "tokens": [{"tenant": "alice", "token": "x" * 16}],
        "indexes": {
            "faces": {
                "path": "p",
                "bundle": "b",
                "profiles": {"default": {"k": 5, "q": 0.5, "sigma": 0.5, "lambda": 0.5}},
            }
        },
    }
    base.update(changes)
    return base


@pytest.mark.parametrize(
    ("doc", "key"),
    [
        (_doc(server={"listen": "nope"}), "server.listen"),
        (_doc(server={"typo": 1}), "server.typo"),
        (_doc(server={"query_threads": 0}), "server.query_threads"),
        (_doc(server={"fixed_response_seconds": 0.0}), "server.fixed_response_seconds"),
        (_doc(server={"metrics_port": 70000}), "server.metrics_port"),
        (_doc(server={"reuse_releases": "yes"}), "server.reuse_releases"),
        (_doc(limits={"max_images": 0}), "limits.max_images"),
        (_doc(limits={"default_steps": 500}), "limits.default_steps"),
        (_doc(tokens=[{"tenant": "alice", "token": "short"}]), "tokens[0].token"),
        (_doc(tokens=[{"tenant": "alice", "token": "x" * 16, "role": "root"}]), "tokens[0].role"),
        (_doc(tokens=[{"tenant": "alice"}]), "tokens[0]"),
        (_doc(tokens=[{"tenant": "a", "token": "x" * 16}, {"tenant": "b", "token": "x" * 16}]), "tokens"),
        (_doc(tokens=[{"tenant": "alice", "token_sha256": "zz"}]), "tokens[0].token_sha256"),
        (_doc(indexes={"faces": {"path": "p", "bundle": "b", "profiles": {}}}), "indexes.faces.profiles"),
        (_doc(indexes={"faces": {"bundle": "b", "profiles": {}}}), "indexes.faces.path"),
        (_doc(indexes={"bad name": {"path": "p", "bundle": "b", "profiles": {}}}), "indexes.bad name"),
        (
            _doc(
                indexes={
                    "faces": {
                        "path": "p",
                        "bundle": "b",
                        "profiles": {"default": {"k": 5, "q": 0.5, "sigma": 0.0, "lambda": 0.5}},
                    }
                }
            ),
            "indexes.faces.profiles.default",
        ),
        (
            _doc(
                indexes={
                    "faces": {
                        "path": "p",
                        "bundle": "b",
                        "profiles": {"default": {"k": 5, "q": 2.0, "sigma": 0.5, "lambda": 0.5}},
                    }
                }
            ),
            "indexes.faces.profiles.default",
        ),
        (
            _doc(
                indexes={
                    "faces": {
                        "path": "p",
                        "bundle": "b",
                        "profiles": {"default": {"k": 5, "q": 0.5, "sigma": 0.5}},
                    }
                }
            ),
            "indexes.faces.profiles.default.lambda",
        ),
        (_doc(budgets={"d": {"epsilon": -1.0}}), "budgets.d.epsilon"),
        (_doc(budgets={"d": {"epsilon": 1.0, "delta": 2.0}}), "budgets.d.delta"),
        (_doc(budgets={"d": {"epsilon": 1.0, "rule": "magic"}}), "budgets.d.rule"),
        (_doc(budgets={"d": {"epsilon": 1.0, "quotas": {"alice": 0.0}}}), "budgets.d.quotas.alice"),
    ],
)
def test_errors_name_the_key(doc, key):
    with pytest.raises(ConfigError) as err:
        parse_config(doc, env={})
    assert str(err.value).startswith(key), str(err.value)


def test_sigma_zero_allowed_on_non_private_index():
    doc = _doc(
        indexes={
            "demo": {
                "path": "p",
                "bundle": "b",
                "private": False,
                "profiles": {"open": {"k": 5, "q": 1.0, "sigma": 0.0, "lambda": 1.0}},
            }
        }
    )
    assert parse_config(doc).indexes[0].profile("open").sigma == 0.0


def test_unreadable_and_malformed_files(tmp_path):
    with pytest.raises(ConfigError, match="cannot read"):
        load_config(tmp_path / "missing.toml")
    (tmp_path / "bad.toml").write_text("[server\n")
    with pytest.raises(ConfigError, match="bad.toml"):
        load_config(tmp_path / "bad.toml")


# -- startup checks (catalog) ----------------------------------------------------------------


def _index(path="fake:domain=corpus-a,n=50,dim=16,public=100", bundle="hash-16", profiles=None, **kw):
    return {
        "path": path,
        "bundle": bundle,
        "profiles": profiles or {"default": {"k": 5, "q": 1.0, "sigma": 0.5, "lambda": 0.5}},
        **kw,
    }


def test_private_index_without_budget_is_not_served():
    cfg = make_config(indexes={"faces": _index()}, budgets={})
    with pytest.raises(StartupError, match=r"corpus-a.*no budget"):
        build_catalog(cfg, MemoryLedger(), fake_loaders())


def test_budget_created_once_then_ledger_is_authoritative():
    ledger = MemoryLedger()
    cfg = make_config(indexes={"faces": _index()}, budgets={"corpus-a": {"epsilon": 3.0}})
    cat = build_catalog(cfg, ledger, fake_loaders())
    assert ledger.budget_state("corpus-a").budget.epsilon == 3.0 and cat.budgets["corpus-a"].delta == 1 / 1000
    build_catalog(cfg, ledger, fake_loaders())  # same budget: fine
    build_catalog(
        make_config(indexes={"faces": _index()}, budgets={}), ledger, fake_loaders()
    )  # ledger has it
    with pytest.raises(StartupError, match="ledger is authoritative"):
        build_catalog(
            make_config(indexes={"faces": _index()}, budgets={"corpus-a": {"epsilon": 4.0}}),
            ledger,
            fake_loaders(),
        )


def test_encoder_mismatch_is_refused():
    with pytest.raises(StartupError, match="refusing the mismatch"):
        build_catalog(make_config(indexes={"faces": _index(bundle="hash-8")}), MemoryLedger(), fake_loaders())


def test_delta_must_be_below_one_over_public_size():
    cfg = make_config(indexes={"faces": _index()}, budgets={"corpus-a": {"epsilon": 3.0, "delta": 0.02}})
    with pytest.raises(StartupError, match="delta"):
        build_catalog(cfg, MemoryLedger(), fake_loaders())


def test_several_profiles_get_a_renyi_filter_and_single_rule_is_checked():
    profiles = {
        "a": {"k": 5, "q": 1.0, "sigma": 0.5, "lambda": 0.5},
        "b": {"k": 8, "q": 1.0, "sigma": 0.5, "lambda": 0.5},
        "pub": {"k": 5, "q": 1.0, "sigma": 0.5, "lambda": 0.0},
    }
    cat = build_catalog(
        make_config(indexes={"faces": _index(profiles=profiles)}, budgets={"corpus-a": {"epsilon": 3.0}}),
        MemoryLedger(),
        fake_loaders(),
    )
    assert cat.budgets["corpus-a"].filter_order is not None
    assert cat.indexes["faces"].profiles["pub"].epsilon_per_query == 0.0
    with pytest.raises(StartupError, match="rule 'single'"):
        build_catalog(
            make_config(
                indexes={"faces": _index(profiles=profiles)},
                budgets={"corpus-a": {"epsilon": 3.0, "rule": "single"}},
            ),
            MemoryLedger(),
            fake_loaders(),
        )


def test_single_profile_ledger_budget_refuses_a_new_profile():
    ledger = MemoryLedger()
    ledger.create_budget("corpus-a", Budget.single(3.0, 1e-4, Profile(k=5, q=1.0, sigma=0.5, lam=0.5)))
    profiles = {"other": {"k": 7, "q": 1.0, "sigma": 0.5, "lambda": 0.5}}
    with pytest.raises(StartupError, match="serves only profile"):
        build_catalog(
            make_config(indexes={"faces": _index(profiles=profiles)}, budgets={}), ledger, fake_loaders()
        )


def test_manifest_private_overrides_config():
    idx = _index(private=False)
    with pytest.raises(StartupError, match="private = false is refused"):
        build_catalog(make_config(indexes={"faces": idx}), MemoryLedger(), fake_loaders())


def test_non_private_index_needs_no_budget_and_is_not_charged():
    idx = _index(
        path="fake:domain=demo,private=0",
        private=False,
        profiles={"open": {"k": 5, "q": 1.0, "sigma": 0.0, "lambda": 1.0}},
    )
    cat = build_catalog(make_config(indexes={"demo": idx}, budgets={}), MemoryLedger(), fake_loaders())
    assert cat.budgets == {}


def test_bad_index_or_bundle_is_named():
    with pytest.raises(StartupError, match="indexes.faces: cannot load bundle"):
        build_catalog(make_config(indexes={"faces": _index(bundle="nope")}), MemoryLedger(), fake_loaders())


def test_same_numbers_with_different_noise_are_two_mechanisms():
    """Issue 12 item 1: two indexes of one domain, same (k, q, sigma, lambda), discrete vs float
    noise, charge two different curves: the domain gets a Rényi filter, never the single rule."""
    same = {"default": {"k": 5, "q": 0.5, "sigma": 0.5, "lambda": 1.0}}
    indexes = {
        "faces": _index(profiles=same),  # private: discrete noise at dimension 16 (default)
        "faces-float": _index(profiles=same, noise="float", allow_float_noise=True),
    }
    cat = build_catalog(make_config(indexes=indexes, budgets={"corpus-a": {"epsilon": 3.0}}), MemoryLedger(), fake_loaders())
    budget = cat.budgets["corpus-a"]
    assert budget.filter_order is not None and budget.profile is None
    a, b = cat.indexes["faces"].profiles["default"], cat.indexes["faces-float"].profiles["default"]
    assert a.profile == b.profile and not (a.charge == b.charge).all()
    with pytest.raises(StartupError, match=r"rule 'single' needs exactly one retrieving mechanism.*discrete noise at dimension 16.*float noise"):
        build_catalog(
            make_config(indexes=indexes, budgets={"corpus-a": {"epsilon": 3.0, "rule": "single"}}),
            MemoryLedger(),
            fake_loaders(),
        )
    one = build_catalog(make_config(indexes={"faces": _index(profiles=same)}, budgets={"corpus-a": {"epsilon": 3.0}}),
                        MemoryLedger(), fake_loaders())
    assert one.budgets["corpus-a"].profile is not None and one.budgets["corpus-a"].hardened_dimension == 16


def test_a_single_budget_refuses_the_same_numbers_with_other_noise():
    prof = Profile(k=5, q=0.5, sigma=0.5, lam=1.0)
    same = {"default": {"k": 5, "q": 0.5, "sigma": 0.5, "lambda": 1.0}}
    ledger = MemoryLedger()
    ledger.create_budget("corpus-a", Budget.single(3.0, 1e-4, prof, hardened_dimension=16))
    build_catalog(make_config(indexes={"faces": _index(profiles=same)}, budgets={}), ledger, fake_loaders())
    floaty = {"faces": _index(profiles=same, noise="float", allow_float_noise=True)}
    with pytest.raises(StartupError, match="serves only profile .* discrete noise at dimension 16.*float noise"):
        build_catalog(make_config(indexes=floaty, budgets={}), ledger, fake_loaders())


def test_budget_without_a_recorded_noise_kind_serves_one_mechanism():
    """A single budget written before noise kinds were recorded (its JSON has no
    ``hardened_dimension``) serves one mechanism of its profile, never two."""
    prof = Profile(k=5, q=0.5, sigma=0.5, lam=1.0)
    legacy = {"epsilon": 3.0, "delta": 1e-4, "profile": prof.to_dict(), "filter_order": None}
    old = Budget.from_dict(legacy)
    assert not old.noise_recorded and old.to_dict() == legacy
    assert Budget.from_dict(Budget.single(3.0, 1e-4, prof).to_dict()).noise_recorded
    same = {"default": {"k": 5, "q": 0.5, "sigma": 0.5, "lambda": 1.0}}
    ledger = MemoryLedger()
    ledger.create_budget("corpus-a", old)
    build_catalog(make_config(indexes={"faces": _index(profiles=same)}, budgets={}), ledger, fake_loaders())
    both = {"faces": _index(profiles=same), "faces-float": _index(profiles=same, noise="float", allow_float_noise=True)}
    with pytest.raises(StartupError, match="may serve ONE mechanism, but the domain serves 2"):
        build_catalog(make_config(indexes=both, budgets={}), ledger, fake_loaders())


def test_an_index_of_group_size_two_is_charged_the_group_curve():
    """An IVF index whose capacity-limited lists may overflow (manifest group_size 2): one record
    can change two stored records, so its queries are charged ``group2_rdp`` and it is a mechanism
    of its own (issue 12, item 4)."""
    from dprdm.privacy import mechanism_rdp
    from dprdm.privacy.orders import DEFAULT_ORDERS

    same = {"default": {"k": 5, "q": 0.5, "sigma": 0.5, "lambda": 1.0}}
    ivf = _index(path="fake:domain=corpus-a,n=50,dim=16,public=100,group=2", profiles=same)
    cat = build_catalog(make_config(indexes={"ivf": ivf}, budgets={"corpus-a": {"epsilon": 30.0}}), MemoryLedger(), fake_loaders())
    served = cat.indexes["ivf"].profiles["default"]
    prof = Profile(k=5, q=0.5, sigma=0.5, lam=1.0)
    expected = mechanism_rdp(prof, orders=DEFAULT_ORDERS, hardened_dimension=16, group_size=2)
    assert (served.charge == expected).all() and cat.budgets["corpus-a"].group_size == 2
    both = {"ivf": ivf, "flat": _index(profiles=same)}
    cat = build_catalog(make_config(indexes=both, budgets={"corpus-a": {"epsilon": 30.0}}), MemoryLedger(), fake_loaders())
    assert cat.budgets["corpus-a"].filter_order is not None  # two mechanisms: the Rényi filter
