"""Smoke test of the benchmark (tests/perf/bench.py --quick): it completes and
its last line is the JSON of figures. No timing is asserted: the figures
depend on the machine, and the targets are checked by reading a full run.
Nor is throughput: the bulk load and the group phase stop at a deadline, so
on a loaded machine they may do less than asked; the figures must then agree
with each other, not be complete."""

import json
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_quick_benchmark_completes_and_reports_json():
    result = subprocess.run([sys.executable, "tests/perf/bench.py", "--quick"], cwd=ROOT,
                            capture_output=True, text=True, timeout=240)
    assert result.returncode == 0, result.stderr[-4000:]
    figures = json.loads(result.stdout.strip().splitlines()[-1])
    assert figures["users"] == 5000 and figures["group_size"] == 5000
    assert figures["client"] in ("wrk", "python")
    # Every user the server counts was acknowledged to the client, and no more.
    assert 0 < figures["bulk_created"] == figures["bulk_acknowledged"] <= 5000
    assert figures["bulk_complete"] == (figures["bulk_created"] == 5000)
    # The group got members from those users (the bench checks a full GET lists them all).
    assert 0 < figures["group_members"] <= figures["bulk_created"]
    for key in ("reference_rps", "bulk_users_per_s", "lookup_rps", "lookup_ratio", "lookup_p50_ms",
                "update_rps", "update_ratio", "group_add_first10_ms", "group_add_last10_ms",
                "group_remove_ms", "group_full_get_bytes", "startup_s", "db_bytes_per_user",
                "bare_lookup_rps", "bare_lookup_ratio", "bare_update_rps", "bare_update_ratio"):
        assert isinstance(figures[key], (int, float)) and figures[key] > 0, (key, figures.get(key))
    # Every request of the throughput phases answered as expected, the bare
    # SCIM server's lookups (found) and PATCHes included.
    for phase in ("lookup", "update", "bare_lookup", "bare_update"):
        assert figures[phase + "_errors"] == 0, (phase, figures[phase + "_errors"])
