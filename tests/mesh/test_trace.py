"""Frame traces (mesh/trace.py) and their reading (perf/trace_ring.py): a peer run with TOGETHER_TRACE
writes one line per event, on the clock every process of the host shares; unset, it writes nothing."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

from perf import trace_ring

ROOT = Path(__file__).resolve().parents[2]
MARK = "from mesh import trace; print(trace.ON); trace.ON and trace.mark('submit', 7)"


def run(env: dict[str, str]) -> str:
    e = {k: v for k, v in os.environ.items() if k != "TOGETHER_TRACE"}
    return subprocess.run([sys.executable, "-c", MARK], cwd=ROOT, env={**e, **env, "PYTHONPATH": str(ROOT)},
                          capture_output=True, text=True, check=True).stdout.strip()


def test_a_traced_process_writes_its_events_on_the_shared_clock_and_an_untraced_one_nothing(tmp_path):
    before = time.monotonic_ns()
    assert run({"TOGETHER_TRACE": str(tmp_path / "t")}) == "True"
    (f,) = (tmp_path / "t").glob("*.log")
    t, event, fid = f.read_text().split()
    assert (event, fid) == ("submit", "7") and before < int(t) < time.monotonic_ns()
    assert run({}) == "False"


def test_segments_follow_a_frame_round_the_ring_and_the_next_launch(tmp_path):
    a, b = tmp_path / "100.log", tmp_path / "200.log"
    ev_a = ["launch", "submit", "cstart", "cend", "resume", "sent"]
    ev_b = ["submit", "cstart", "cend", "resume", "sent"]
    lines_a, lines_b = [], []
    for fid, t0 in ((1, 0), (2, 100_000)):  # frame 2 launched 10 us after frame 1 came back
        lines_a += [f"{t0 + i * 1000} {e} {fid}" for i, e in enumerate(ev_a)]  # 1 us apart
        lines_b += [f"{t0 + 10_000 + i * 2000} {e} {fid}" for i, e in enumerate(ev_b)]  # 2 us apart
        lines_a += [f"{t0 + 30_000} deliver {fid}", f"{t0 + 90_000} back {fid}"]
    a.write_text("\n".join(lines_a) + "\n")
    b.write_text("\n".join(lines_b) + "\n")
    (tmp_path / "300.log").write_text("5 launch 1\n")  # another process's: not one of the ring's
    seg, relaunch = trace_ring.segments(trace_ring.read(tmp_path, {100: "a", 200: "b"}))
    assert seg["a:submit"] == [1.0, 1.0] and seg["b:cstart"] == [2.0, 2.0]
    assert seg["a:sent"] == [5.0, 5.0]  # a sent at 5 us, b took it at 10 us
    assert seg["b:sent"] == [12.0, 12.0] and seg["a:deliver"] == [60.0, 60.0]
    assert seg["total"] == [90.0, 90.0] and relaunch == [10.0]
