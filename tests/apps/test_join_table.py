"""`together join`'s and `together status`'s table: what each peer runs and how fast."""

from __future__ import annotations

import re

import pytest

from apps.join import render_plan
from protos import together_pb2 as pb


def test_the_table_says_each_peers_dtype_weight_format_and_measured_speed() -> None:
    peers = [pb.PeerInfo(node_id="t", name="linux", backend="torch", dtype="bfloat16", weight_format="int4/g32",
                         layer_ms=0.8234, address="10.0.0.2:7000", ready=True, start=0, end=19),
             pb.PeerInfo(node_id="m", name="mac", backend="mlx", dtype="float32", weight_format="float32",
                         layer_ms=8.96, address="10.0.0.3:7000", ready=True, start=19, end=30),
             pb.PeerInfo(node_id="s", name="spare", backend="torch", address="10.0.0.4:7000", start=-1, end=-1)]
    plan = pb.Plan(epoch=3, coordinator="t", num_layers=30, complete=True, peers=peers,
                   stages=[pb.Assignment(node_id="t", start=0, end=19), pb.Assignment(node_id="m", start=19, end=30)])
    table = render_plan(plan, me="m")
    assert re.search(r"peer\s+backend\s+dtype\s+weights\s+ms/layer\s+layers\s", table), table
    assert re.search(r"C\s+linux\s+torch\s+bfloat16\s+int4/g32\s+0\.82\s+\[0, 19\)", table), table
    assert re.search(r"\*\s+mac\s+mlx\s+float32\s+float32\s+8\.96\s+\[19, 30\)", table), table
    # a peer that has not reported (or could not measure) says so instead of a number
    assert re.search(r"spare\s+torch\s+-\s+-\s+-\s+standby", table), table


def test_the_table_shows_a_peer_fetching_its_weights_from_peers() -> None:
    peers = [pb.PeerInfo(node_id="t", name="alpha", backend="torch", ready=True, start=0, end=15),
             pb.PeerInfo(node_id="n", name="newcomer", backend="torch", start=-1, end=-1,
                         weights="fetching 41% of 27.5 MB from alpha")]
    plan = pb.Plan(epoch=2, coordinator="t", num_layers=30, peers=peers,
                   stages=[pb.Assignment(node_id="t", start=0, end=15), pb.Assignment(node_id="n", start=15, end=30)])
    table = render_plan(plan)
    assert re.search(r"newcomer .*\[15, 30\)\s.*loading \(fetching 41% of 27\.5 MB from alpha\)", table), table
    assert "fetching" not in next(line for line in table.splitlines() if "alpha " in line)


def test_a_model_no_peer_has_and_no_hub_gives_is_one_clear_error(tmp_path) -> None:
    from tests.helpers import together

    r = together("join", "--model", str(tmp_path / "nowhere.gguf"), "--no-mdns", "--backend", "torch",
                 timeout=120, env={"TOGETHER_CACHE": str(tmp_path / "cache")})
    assert r.returncode != 0
    err = r.stderr.strip().splitlines()[-1]
    # both ways named: a path or hub id here, or a peer that has it
    assert "not found" in err and "--peer HOST:PORT" in err and "nowhere" in err, r.stderr[-2000:]
    assert "Traceback" not in r.stderr


def test_a_busy_api_port_is_a_clear_error_before_the_peer_joins(embedded_path) -> None:
    """The API port is taken before the peer enters the mesh (its tokenizer loads while it does)."""
    import socket

    from tests.helpers import together

    with socket.create_server(("127.0.0.1", 0)) as busy:
        port = busy.getsockname()[1]
        r = together("join", "--model", str(embedded_path), "--no-mdns", "--backend", "torch", "--host",
                     "127.0.0.1", "--api-port", str(port), timeout=120)
    assert r.returncode == 2, r.stderr[-2000:]
    err = r.stderr.strip().splitlines()[-1]
    assert f"cannot serve the API on 127.0.0.1:{port}" in err and "pick another --api-port" in err, r.stderr[-2000:]
    assert "joined mesh" not in r.stderr and "Traceback" not in r.stderr


@pytest.mark.slow
def test_a_stopped_peer_leaves_cleanly_and_ends_without_the_interpreters_teardown(embedded_path, tmp_path) -> None:
    """Ctrl-C: the peer leaves, says so, exits 0, and skips the interpreter's teardown (garbage collection
    over torch's objects: seconds before its process was gone). A sitecustomize's atexit hook, which runs
    in that teardown, shows it was skipped."""
    import os
    import signal

    from mesh.local import ROOT
    from tests.mesh.cluster import Cluster

    site = tmp_path / "site"
    site.mkdir()
    marker = tmp_path / "teardown-ran"
    (site / "sitecustomize.py").write_text(f"import atexit\natexit.register(open, {str(marker)!r}, 'w')\n")
    c = Cluster(str(embedded_path))
    try:
        env = {"PYTHONPATH": os.pathsep.join([str(site), str(ROOT)])}
        a = c.add("a", "--backend", "torch", "--dtype", "float32", "--no-mdns", "--layers", "0-30", api=True, env=env)
        c.wait_ready(a, stages=1)
        assert a.stop(signal.SIGINT) == 0
        assert a.log().rstrip().endswith("a leaving the mesh"), a.log()[-2000:]
        assert not marker.exists()
    finally:
        c.stop()
