"""The server side of ``dprdm bench load``: a ``dprdm`` server subprocess on loopback serving a
benchmark configuration (real index loader and SQLite ledger, test bundles).

With ``server.workers`` > 1 in the configuration the subprocess is a supervisor
(:class:`dprdm.server.supervisor.Supervisor`) whose workers are this module again
(``--serve-worker``), as ``dprdm serve --workers N`` runs them."""

from __future__ import annotations

import asyncio
import json
import os
import select
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

__all__ = ["LocalServer", "TOKEN_ENV"]

TOKEN_ENV = "DPRDM_BENCH_TOKEN"


class LocalServer:
    """A ``dprdm`` server subprocess on 127.0.0.1 port 0 (real SQLite ledger, test bundle).

    Args:
        doc: the configuration (``server_document``).
        token: the tenant token (passed through the environment, never on the command line).
        workdir: where the configuration and the server's stderr log go.
        startup_timeout: seconds to wait for the port.

    Raises:
        RuntimeError: the server exited or did not report its port in time (with its log tail).
    """

    def __init__(self, doc: dict[str, Any], token: str, workdir: Path, startup_timeout: float = 300.0) -> None:
        workdir.mkdir(parents=True, exist_ok=True)
        conf = workdir / "server.json"
        conf.write_text(json.dumps(doc))
        self.log = workdir / "server.log"
        env = {**os.environ, TOKEN_ENV: token}
        cmd = [sys.executable, "-m", "dprdm.benchmarks.load_server", "--serve-child", str(conf)]
        with self.log.open("wb") as err:
            self.proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=err, env=env)
        self.pid = self.proc.pid
        self.port = self._wait_port(startup_timeout)
        self.address = f"127.0.0.1:{self.port}"

    def _wait_port(self, timeout: float) -> int:
        assert self.proc.stdout is not None
        deadline, buf = time.monotonic() + timeout, b""
        while time.monotonic() < deadline and self.proc.poll() is None:
            ready, _, _ = select.select([self.proc.stdout], [], [], 0.2)
            if ready:
                buf += os.read(self.proc.stdout.fileno(), 4096)
                for line in buf.decode(errors="replace").splitlines():
                    if "listening on port" in line:
                        return int(line.rsplit(" ", 1)[-1])
        self.stop()
        tail = self.log.read_text(errors="replace")[-2000:]
        raise RuntimeError(f"the benchmark server did not start; its log ends with:\n{tail}")

    def cpu_seconds(self) -> float:
        """User + system CPU time so far of the server process and its live workers (Linux
        ``/proc``; NaN elsewhere)."""
        try:
            return sum(_cpu(pid) for pid in (self.pid, *_children(self.pid)))
        except (OSError, IndexError, ValueError):
            return float("nan")

    def workers(self) -> list[int]:
        """The pids of the workers of a supervisor (empty for a single server)."""
        return _children(self.pid)

    def stop(self) -> None:
        """SIGTERM (graceful stop), then SIGKILL after 30 s."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        if self.proc.stdout is not None:
            self.proc.stdout.close()

    def __enter__(self) -> LocalServer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def _cpu(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _children(pid: int) -> list[int]:
    try:
        return [int(p) for p in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
    except OSError:
        return []


def _config(config_file: str, **overrides: Any) -> Any:
    from dprdm.server.config import parse_config

    path = Path(config_file)
    return parse_config(json.loads(path.read_text()), base_dir=path.parent).with_overrides(**overrides)


def _serve(config: Any) -> None:
    from dprdm.server.adapters import load_index
    from dprdm.server.app import serve
    from dprdm.server.catalog import Loaders
    from dprdm.server.testing import fake_loaders

    asyncio.run(serve(config, loaders=Loaders(index=load_index, bundle=fake_loaders().bundle)))


def _serve_child(config_file: str) -> None:
    """Serve a bench configuration: the real index loader and SQLite ledger, the test bundles;
    a supervisor of ``--serve-worker`` processes when ``server.workers`` > 1."""
    config = _config(config_file)
    if config.workers == 1:
        _serve(config)
        return
    from dprdm.server.supervisor import Supervisor, WorkerPlace

    def command(place: WorkerPlace) -> list[str]:
        metrics = "" if place.metrics_port is None else str(place.metrics_port)
        return [sys.executable, "-m", "dprdm.benchmarks.load_server", "--serve-worker", config_file, place.listen,
                str(os.getpid()), metrics]  # fmt: skip

    sys.exit(Supervisor(config, command).run())


def _serve_worker(config_file: str, listen: str, parent: str, metrics_port: str) -> None:
    """One worker of a ``_serve_child`` supervisor: the supervisor's port, its own metrics port."""
    from dprdm.server.supervisor import watch_parent

    watch_parent(int(parent))
    _serve(_config(config_file, listen=listen, metrics_port=int(metrics_port) if metrics_port else None))


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "--serve-child":
        _serve_child(sys.argv[2])
    elif len(sys.argv) == 6 and sys.argv[1] == "--serve-worker":
        _serve_worker(*sys.argv[2:])
    else:
        sys.exit("usage: python -m dprdm.benchmarks.load_server --serve-child CONFIG.json (internal)")
