"""`together join`'s and `together status`'s table: what each peer runs and how fast."""

from __future__ import annotations

import re

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
