import pytest

from backends.errors import ShardSpecError
from backends.pipeline import SliceSpec, parse_shards


def test_parse_mixed_spec():
    assert parse_shards("mlx:0-12,torch:12-30", 30, "torch") == [
        SliceSpec("mlx", 0, 12), SliceSpec("torch", 12, 30)]
    assert parse_shards("0-1, 1-30", 30, "mlx") == [SliceSpec("mlx", 0, 1), SliceSpec("mlx", 1, 30)]


def test_parse_tensor_parallel_spec():
    assert parse_shards("mlx:0-10,torch:10-20*2,mlx:20-30", 30, "torch") == [
        SliceSpec("mlx", 0, 10), SliceSpec("torch", 10, 20, tp=2), SliceSpec("mlx", 20, 30)]
    assert parse_shards("0-30*4", 30, "torch") == [SliceSpec("torch", 0, 30, 4)]
    assert parse_shards("mlx:0-30*1", 30, "torch") == [SliceSpec("mlx", 0, 30)]


@pytest.mark.parametrize("spec,msg", [
    ("mlx:0-10,torch:12-30", "gap in --shards: layers 10-12"),
    ("mlx:0-12,torch:10-30", "overlap in --shards: layer 10"),
    ("mlx:0-12,torch:12-31", "model has 30 layers"),
    ("mlx:0-12,torch:12-29", "stops at layer 29"),
    ("mlx:5-30", "gap in --shards: layers 0-5"),
    ("cuda:0-30", "unknown backend 'cuda'"),
    ("mlx:12-12,torch:12-30", "START must be below END"),
    ("mlx:0to30", "expected BACKEND:START-END"),
    ("", "expected BACKEND:START-END"),
    ("torch:0-30*0", r"'\*0' must be a number of tensor-parallel ranks, e.g. torch:0-30\*2"),
    ("torch:0-30*", r"'\*' must be a number of tensor-parallel ranks"),
    ("torch:0-30*two", r"'\*two' must be a number"),
    ("torch:0-30x2", "or mlx:0-12\\*2 for a tensor-parallel group of 2"),
])
def test_bad_specs_are_clear(spec, msg):
    with pytest.raises(ShardSpecError, match=msg):
        parse_shards(spec, 30, "torch")
