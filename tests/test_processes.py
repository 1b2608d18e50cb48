"""dcc.evaluation.processes: a command measured in its own process."""

import json
import subprocess
import sys

import pytest

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


# a bench worker: records when it ran, writes its method and arguments to its --worker path
WORKER = """
import json, sys, time
args = sys.argv[1:]
method, path = args[args.index("--methods") + 1], args[args.index("--worker") + 1]
start = time.time()
if method == "bad":
    print("bad method: nothing to register", flush=True)
    sys.exit(4)
time.sleep(0.5)
with open(path, "w", encoding="utf-8") as f:
    json.dump({"method": method, "argv": args, "start": start, "end": time.time()}, f)
"""


def test_method_workers_run_in_parallel_in_order_and_stop_at_a_failure(tmp_path):
    from dcc.evaluation.processes import run_method_workers

    script = tmp_path / "worker.py"
    script.write_text(WORKER, encoding="utf-8")
    argv = ["--cases", "2", "--methods", "x", "y", "--threads", "1"]
    done = run_method_workers(script, argv, ["a", "b", "c"], tmp_path, name="t", workers=2)
    assert [d[0] for d in done] == ["a", "b", "c"]
    runs = [json.loads(path.read_text(encoding="utf-8")) for _, path, _, _ in done]
    assert [r["method"] for r in runs] == ["a", "b", "c"]
    # the bench's own --methods list is replaced by the one method
    assert runs[0]["argv"][:4] == ["--cases", "2", "--threads", "1"]
    a, b, c = runs
    assert a["start"] < b["end"] and b["start"] < a["end"]  # a and b ran at the same time
    assert c["start"] >= min(a["end"], b["end"]) - 0.05  # c waited for a free worker

    with pytest.raises(SystemExit, match="(?s)method bad failed \\(exit 4\\).*nothing to register"):
        run_method_workers(script, argv, ["bad", "z"], tmp_path, name="t", workers=1)
    assert not (tmp_path / "z.json").exists()  # no method starts after a failure
    with pytest.raises(ValueError, match="workers must be >= 1"):
        run_method_workers(script, argv, ["a"], tmp_path, workers=0)
