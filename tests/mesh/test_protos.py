import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def test_stubs_are_fresh() -> None:
    pytest.importorskip("grpc_tools")
    proc = subprocess.run(
        [sys.executable, str(ROOT / "protos" / "generate.py"), "--check"],
        capture_output=True,
        text=True,
        cwd=ROOT,
    )
    assert proc.returncode == 0, proc.stderr + proc.stdout


def test_frame_round_trip() -> None:
    from protos import together_pb2 as pb

    frame = pb.Frame(
        frame_id=7,
        epoch=3,
        seqs=[
            pb.SeqEntry(
                seq_id="a",
                offset=0,
                length=2,
                start=True,
                sampling=pb.SamplingParams(temperature=0.5, top_k=40, has_seed=True, seed=-1),
                history=[1, 2],
            ),
            pb.SeqEntry(seq_id="b", offset=9, length=1),
        ],
        dtype="float16",
        shape=[3, 4],
        data=bytes(range(24)),
        origin="127.0.0.1:5000",
        hop_ms=[1.25],
    )
    back = pb.Frame.FromString(frame.SerializeToString())
    assert back == frame
    assert back.seqs[0].sampling.seed == -1
    assert len(back.data) == 3 * 4 * 2


def test_grpc_stub_imports_as_package() -> None:
    from protos import together_pb2_grpc

    assert hasattr(together_pb2_grpc, "TogetherStub")
    assert hasattr(together_pb2_grpc, "add_TogetherServicer_to_server")
