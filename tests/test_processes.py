"""dcc.evaluation.processes: a command measured in its own process."""

import sys

from dcc.evaluation.processes import run_measured


def test_exit_code_log_and_the_childs_own_peak_memory(tmp_path):
    code = "import sys; b = bytearray(300 * 2**20); b[::4096] = b'x' * len(b[::4096]); " \
           "print('done', flush=True); sys.exit(3)"
    exit_code, seconds, peak = run_measured([sys.executable, "-c", code], tmp_path / "log.txt")
    assert exit_code == 3 and seconds > 0
    assert (tmp_path / "log.txt").read_text().strip() == "done"
    assert 300 < peak < 1000  # the 300 MiB it touched (plus what it inherits at the fork)
    small = run_measured([sys.executable, "-c", "pass"], tmp_path / "small.txt", cwd=tmp_path)
    assert small[0] == 0 and small[2] < peak - 50
