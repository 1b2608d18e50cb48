"""A command in its own process, measured: exit code, wall seconds, peak resident memory.

Standard library only, so that a bench importing it keeps torch out of its own memory: on
Linux a child's ``ru_maxrss`` starts from its parent's resident memory at the fork.
"""

from __future__ import annotations

import os
import subprocess
import time
from collections.abc import Mapping, Sequence
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
