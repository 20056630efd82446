"""The deployment files are well-formed (issue 13 item 12). No Docker engine runs here, so the
images are NOT built: these checks parse the files and check what they reference exists."""

from __future__ import annotations

import configparser
import re
import tomllib
from pathlib import Path

import pytest

from dprdm.server.config import ServerConfig, parse_config

ROOT = Path(__file__).resolve().parent.parent
DEPLOY = ROOT / "deploy"


def _extras() -> set[str]:
    return set(tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"])


def _instructions(path: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) of a Dockerfile, continuation lines joined, comments dropped."""
    text = re.sub(r"\\\n", " ", "\n".join(x for x in path.read_text().splitlines() if not x.lstrip().startswith("#")))
    return [(line.split(None, 1)[0].upper(), line.split(None, 1)[1]) for line in text.splitlines() if line.strip()]


@pytest.mark.parametrize("name", ["Dockerfile", "Dockerfile.cuda"])
def test_dockerfiles_reference_existing_extras_and_paths(name: str) -> None:
    ins = _instructions(DEPLOY / name)
    kinds = [k for k, _ in ins]
    assert kinds[0] == "FROM" and {"USER", "HEALTHCHECK", "EXPOSE", "VOLUME", "ENTRYPOINT", "CMD"} <= set(kinds)
    user = [a for k, a in ins if k == "USER"][-1]
    assert user.strip() not in ("root", "0"), "the server must not run as root"
    installs = [a for k, a in ins if k == "RUN" and re.search(r"pip install '\.\[", a)]
    assert installs, "the image installs the project with its extras"
    for args in installs:
        for group in re.findall(r"'\.\[([a-z,]+)\]'", args):
            assert set(group.split(",")) <= _extras(), f"{name}: unknown extra in {group}"
            assert not {"gpu", "build"} <= set(group.split(",")), "gpu and build install two faiss wheels"
    for k, args in ins:
        if k == "COPY":
            *sources, _dest = args.split()
            for src in sources:
                assert (ROOT / src).exists(), f"{name}: COPY {src} does not exist"
    copied = {a.split()[0] for k, a in ins if k == "COPY"}
    packages = set(tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["package-dir"].values())
    assert {p.split("/")[0] for p in packages} <= copied, f"{name}: a package folder is not copied"


def test_cpu_image_uses_cpu_torch_and_the_documented_extras() -> None:
    text = (DEPLOY / "Dockerfile").read_text()
    assert "FROM python:3.11-slim" in text and "download.pytorch.org/whl/cpu" in text
    assert "'.[server,models,build]'" in text
    assert "'.[server,models,baselines,gpu]'" in (DEPLOY / "Dockerfile.cuda").read_text()  # README "Install"
    assert "FROM nvidia/cuda:" in (DEPLOY / "Dockerfile.cuda").read_text()


def test_compose_builds_an_index_then_serves_it() -> None:
    yaml = pytest.importorskip("yaml")
    doc = yaml.safe_load((DEPLOY / "compose.yaml").read_text())
    build, server = doc["services"]["index-build"], doc["services"]["server"]
    assert "./photos:/photos:ro" in build["volumes"] and "index:/index" in build["volumes"]
    assert "dprdm index build" in " ".join(build["command"]) and "/photos" in " ".join(build["command"])
    assert server["depends_on"]["index-build"]["condition"] == "service_completed_successfully"
    assert "index:/index:ro" in server["volumes"] and "data:/data" in server["volumes"]
    assert set(doc["volumes"]) == {"index", "data", "pgdata"}
    assert server["healthcheck"]["test"][0] == "CMD" and server["stop_signal"] == "SIGTERM"
    grace = ServerConfig().shutdown_grace if hasattr(ServerConfig(), "shutdown_grace") else 30.0
    assert float(server["stop_grace_period"].rstrip("s")) > grace
    for service in (build, server):
        assert service["build"]["dockerfile"] == "deploy/Dockerfile" and (DEPLOY / service["build"]["context"]).is_dir()
    for mount in server["volumes"]:
        if mount.startswith("./"):
            assert (DEPLOY / mount.split(":")[0]).exists()
    assert all(re.search(r"\$\{DPRDM_(TOKEN_\w+|DB_PASSWORD):\?", v) for v in server["environment"].values())


def test_compose_runs_the_ledger_database_and_the_server_uses_it() -> None:
    yaml = pytest.importorskip("yaml")
    doc = yaml.safe_load((DEPLOY / "compose.yaml").read_text())
    db, server = doc["services"]["ledger-db"], doc["services"]["server"]
    assert db["image"].startswith("postgres:") and "pgdata:/var/lib/postgresql/data" in db["volumes"]
    assert db["healthcheck"]["test"][:2] == ["CMD", "pg_isready"]
    assert server["depends_on"]["ledger-db"]["condition"] == "service_healthy"
    password = "${DPRDM_DB_PASSWORD:?"
    assert db["environment"]["POSTGRES_PASSWORD"].startswith(password)  # required, never a default
    assert server["environment"]["PGPASSWORD"].startswith(password)  # the password is not in the file
    cfg = parse_config(tomllib.loads((DEPLOY / "server.toml").read_text()), base_dir=DEPLOY,
                       env={"DPRDM_TOKEN_ALICE": "a" * 32, "DPRDM_TOKEN_ADMIN": "b" * 32})  # fmt: skip
    user, db_name = db["environment"]["POSTGRES_USER"], db["environment"]["POSTGRES_DB"]
    assert cfg.ledger.url == f"postgresql://{user}@ledger-db:5432/{db_name}"


def test_deploy_configuration_is_valid_and_matches_compose() -> None:
    data = tomllib.loads((DEPLOY / "server.toml").read_text())
    cfg = parse_config(data, base_dir=DEPLOY, env={"DPRDM_TOKEN_ALICE": "a" * 32, "DPRDM_TOKEN_ADMIN": "b" * 32})
    assert cfg.listen.endswith(":50051") and cfg.data_dir == "/data"
    assert [i.path for i in cfg.indexes] == ["/index/photos"]
    assert "--corpus-id photos" in (DEPLOY / "compose.yaml").read_text().replace("\n", " ").replace("  ", " ")
    assert [b.domain for b in cfg.budgets] == ["photos"]


def test_systemd_unit_has_the_required_sections() -> None:
    unit = configparser.ConfigParser(strict=False, interpolation=None)
    unit.optionxform = str  # type: ignore[assignment,method-assign]
    unit.read_string((DEPLOY / "dprdm.service").read_text())
    assert {"Unit", "Service", "Install"} <= set(unit.sections())
    svc = unit["Service"]
    assert svc["Type"] in ("simple", "notify") and svc["User"] == "dprdm"
    assert svc["ExecStart"].split()[1:] == ["serve", "--config", "/etc/dprdm/server.toml"]
    assert svc["Restart"] == "on-failure" and svc["KillSignal"] == "SIGTERM"
    grace = getattr(ServerConfig(), "shutdown_grace", 30.0)
    assert float(svc["TimeoutStopSec"].rstrip("s")) > grace
    assert svc["ProtectSystem"] == "strict" and svc["NoNewPrivileges"] == "yes"
    assert unit["Install"]["WantedBy"] == "multi-user.target"


def test_healthcheck_probe_is_in_the_images() -> None:
    assert (DEPLOY / "healthcheck.py").is_file()
    for name in ("Dockerfile", "Dockerfile.cuda"):
        assert "deploy/healthcheck.py" in (DEPLOY / name).read_text()


def _reasons() -> set[str]:
    text = (ROOT / "server" / "status.py").read_text()
    table = set(re.findall(r"grpc\.StatusCode\.[A-Z_]+,\s*\"([A-Z_]+)\"\)", text))
    return table | set(re.findall(r"reason=\"([A-Z_]+)\"", text))


def test_readme_lists_every_refusal_reason() -> None:
    reasons = _reasons()
    assert {"PRIVACY_BUDGET_EXHAUSTED", "TENANT_QUOTA_EXHAUSTED", "INTERNAL"} <= reasons
    readme = (ROOT / "README.md").read_text()
    section = readme.split("### Refusal reasons", 1)[1].split("\n## ", 1)[0]
    missing = sorted(r for r in reasons if f"`{r}`" not in section)
    assert not missing, f"README 'Refusal reasons' lacks {missing}"


def test_readme_deploy_section_says_how_to_run_each() -> None:
    section = (ROOT / "README.md").read_text().split("## Deploy", 1)[1].split("\n## ", 1)[0]
    for needle in ("deploy/Dockerfile ", "deploy/Dockerfile.cuda", "docker compose up", "systemctl enable",
                   "docs/CONFIG.md"):
        assert needle in section, needle
