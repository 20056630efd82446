"""Where a ``Retrieve`` spends the server's time: ``dprdm bench load --profile`` (issue 14).

Samples the benchmark server (the supervisor and its workers) with ``py-spy`` (``pip install
py-spy``; sampling another process may need ``CAP_SYS_PTRACE`` or root) while a cell runs, in
``--gil`` mode: a sample is taken only from the thread holding the GIL, so the samples measure
Python CPU time, which is what one process cannot have more than one core of. Each sample's
stack is put in ONE stage by the first rule of :data:`STAGES` that matches it, and a stage's
share becomes milliseconds of GIL time per request. Native work done without the GIL (gRPC's
C-core threads, SQLite's fsync, large numpy operations) is not in the samples; the server's
total CPU per request (``/proc``) is reported beside them.

This measures the synthetic benchmark server only (random vectors, the hash test encoder): no
private data, and per-query timings never leave the benchmark (SPEC §3 keeps them out of the
server's own metrics and logs).
"""

from __future__ import annotations

import re
import shutil
import signal
import subprocess
import sys
from collections import Counter
from pathlib import Path
from typing import Any

__all__ = ["STAGES", "NO_PY_SPY", "Profiler", "classify", "py_spy", "stage_table"]

STAGES: tuple[tuple[str, str], ...] = (
    ("noise pool refill (background)", r"dprdm-noise-pool|NoisePool\._run"),
    ("ledger committer thread", r"ledger-committer|_commit_loop"),
    ("query: encode prompt", r"_encode \(server/query"),
    ("query: replay/reuse lookups", r"request_binding|find_release"),
    ("query: ledger reserve (call)", r"answer_query.*charge"),
    ("query: new DP generator", r"new_dp_generator|check_dp_generator"),
    ("query: subsampled search", r"_search \(server/query|search_subsampled"),
    ("query: release (noise + mix)", r"release_hardened|_release \(server/query"),
    ("query: store release (call)", r"_store \(server/query|store_release"),
    ("query: other", r"answer_query|dprdm-query"),
    ("asyncio: plan + binding hash", r"plan_query|binding_hash"),
    ("asyncio: request/response conversion", r"converters\.py"),
    ("asyncio: service (submit, await)", r"service\.py"),
    ("asyncio: auth + access interceptors", r"server/auth\.py|server/access\.py|server/metrics\.py"),
    ("asyncio: gRPC and event loop", r"MainThread|asyncio|grpc|_cython"),
)
"""(stage, regular expression over the ``;``-joined stack with its thread name): first match wins."""


NO_PY_SPY = "--stages needs py-spy: pip install py-spy"


def py_spy() -> str | None:
    """The ``py-spy`` executable (on ``PATH`` or beside this Python), or None."""
    found = shutil.which("py-spy")
    beside = Path(sys.executable).with_name("py-spy")
    return found or (str(beside) if beside.is_file() else None)


def classify(stack: str) -> str:
    """The stage of one sampled stack (``other`` if no rule matches)."""
    for name, pattern in STAGES:
        if re.search(pattern, stack):
            return name
    return "other"


class Profiler:
    """``py-spy record --gil`` of a process and its subprocesses, raw (collapsed) output.

    Args:
        pid: the server (supervisor) process.
        out: the raw stack file to write.
        rate: samples per second.

    Raises:
        RuntimeError: ``py-spy`` is not installed (one line: how to install it).
    """

    def __init__(self, pid: int, out: Path, rate: int = 200) -> None:
        exe = py_spy()
        if exe is None:
            raise RuntimeError(NO_PY_SPY)
        self.out, self.rate = out, rate
        self.proc = subprocess.Popen(
            [exe, "record", "--pid", str(pid), "--subprocesses", "--gil", "--threads", "--nonblocking",
             "-r", str(rate), "--format", "raw", "-o", str(out)],
            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
        )  # fmt: skip

    def stop(self) -> Counter[str]:
        """Stop sampling; samples per stage."""
        self.proc.send_signal(signal.SIGINT)
        _, err = self.proc.communicate(timeout=60)
        if not self.out.is_file():
            raise RuntimeError(f"py-spy wrote no samples: {err.decode(errors='replace').strip()[-300:]}")
        stages: Counter[str] = Counter()
        for line in self.out.read_text(errors="replace").splitlines():
            stack, _, count = line.rpartition(" ")
            if count.isdigit():
                stages[classify(stack)] += int(count)
        return stages


def stage_table(stages: Counter[str], *, rate: int, requests: int, server_cpu_us: float | None) -> dict[str, Any]:
    """GIL milliseconds per request by stage (JSON-ready), with the total and the server's CPU."""
    ms = {k: v / rate / max(1, requests) * 1e3 for k, v in stages.most_common()}
    return {"gil_ms_per_request": {k: round(v, 3) for k, v in ms.items()},
            "gil_ms_total": round(sum(ms.values()), 3),
            "server_cpu_ms_per_request": None if server_cpu_us is None else round(server_cpu_us / 1e3, 3)}  # fmt: skip
