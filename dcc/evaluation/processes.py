"""A command in its own process, measured: exit code, wall seconds, peak resident memory.

Standard library only, so that a bench importing it keeps torch out of its own memory: on
Linux a child's ``ru_maxrss`` starts from its parent's resident memory at the fork.
"""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path


def run_measured(
    command: Sequence[str],
    log: str | os.PathLike,
    env: Mapping[str, str] | None = None,
    cwd: str | os.PathLike | None = None,
) -> tuple[int, float, float]:
    """Run ``command`` (stdout and stderr to ``log``, no stdin); return its exit code, wall
    seconds and the peak resident memory of that process in MiB (``ru_maxrss`` of
    ``os.wait4``: its own, not ours). The process is killed if we are interrupted."""
    start = time.perf_counter()
    with open(Path(log), "wb") as out:
        proc = subprocess.Popen(list(command), stdout=out, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL, env=None if env is None else dict(env),
                                cwd=cwd)
        try:
            _, status, usage = os.wait4(proc.pid, 0)
        except BaseException:
            proc.kill()
            proc.wait()
            raise
    return os.waitstatus_to_exitcode(status), time.perf_counter() - start, usage.ru_maxrss / 1024


def strip_option(argv: Sequence[str], option: str) -> list[str]:
    """``argv`` without ``option`` and the values that follow it (up to the next ``-...``)."""
    out, skipping = [], False
    for word in argv:
        skipping = word == option or (skipping and not word.startswith("-"))
        out += [] if skipping else [word]
    return out


def run_method_workers(
    script: str | os.PathLike,
    argv: Sequence[str],
    methods: Sequence[str],
    work: str | os.PathLike,
    *,
    methods_option: str = "--methods",
    worker_option: str = "--worker",
    name: str = "bench",
    workers: int = 1,
) -> list[tuple[str, Path, float, float]]:
    """Each method in its own process, so that its peak resident memory is its own: runs
    ``python script *argv --methods M --worker <work>/M.json`` (``argv`` without its own
    ``--methods`` list) for every ``M``, ``workers`` processes at a time, the log in
    ``<work>/M.log``. Returns per method, in the order of ``methods``, ``(method, its --worker
    path, wall seconds, peak RSS MiB)``; a failed method stops the bench (``SystemExit`` with
    the tail of its log; methods already running finish, no other starts)."""
    if workers < 1:
        raise ValueError(f"{name}: workers must be >= 1, got {workers}")
    work = Path(work)
    own = strip_option(argv, methods_option)

    failed = threading.Event()

    def run(method):
        if failed.is_set():  # after a failure no queued method starts
            return None
        path, log = work / f"{method}.json", work / f"{method}.log"
        command = [sys.executable, str(script), *own, methods_option, method, worker_option,
                   str(path)]
        code, seconds, rss = run_measured(command, log)
        if code != 0:
            failed.set()
            tail = log.read_text(encoding="utf-8", errors="replace")[-3000:]
            raise SystemExit(f"{name}: method {method} failed (exit {code}):\n{tail}")
        print(f"{name}: {method}: {seconds:.0f} s, peak RSS {rss:.0f} MB", flush=True)
        return method, path, seconds, rss

    with ThreadPoolExecutor(max_workers=workers) as pool:
        return list(pool.map(run, methods))
