"""dcc.evaluation.processes: a command measured in its own process."""

import json
import subprocess
import sys

# run from a small parent: on Linux a child's ru_maxrss starts from its parent's resident memory
# at the fork, and this pytest process may hold gigabytes
SCRIPT = """
import json, sys
from dcc.evaluation.processes import run_measured
big = ("import sys; b = bytearray(300 * 2**20); b[::4096] = b'x' * len(b[::4096]); "
       "print('done', flush=True); sys.exit(3)")
print(json.dumps([run_measured([sys.executable, "-c", big], sys.argv[1] + "/big.txt"),
                  run_measured([sys.executable, "-c", "pass"], sys.argv[1] + "/small.txt",
                               cwd=sys.argv[1])]))
"""


def test_exit_code_log_and_the_childs_own_peak_memory(tmp_path):
    out = subprocess.run([sys.executable, "-c", SCRIPT, str(tmp_path)], capture_output=True,
                         text=True, check=True).stdout
    (code, seconds, peak), (small_code, _, small_peak) = json.loads(out)
    assert code == 3 and seconds > 0 and small_code == 0
    assert (tmp_path / "big.txt").read_text(encoding="utf-8").strip() == "done"
    assert 300 < peak < 600  # the 300 MiB it touched
    assert small_peak < 100  # an empty interpreter
