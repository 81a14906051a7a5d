import pytest

from backends.errors import ShardSpecError
from backends.pipeline import SliceSpec, parse_shards


def test_parse_mixed_spec():
    assert parse_shards("mlx:0-12,torch:12-30", 30, "torch") == [
        SliceSpec("mlx", 0, 12), SliceSpec("torch", 12, 30)]
    assert parse_shards("0-1, 1-30", 30, "mlx") == [SliceSpec("mlx", 0, 1), SliceSpec("mlx", 1, 30)]


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
])
def test_bad_specs_are_clear(spec, msg):
    with pytest.raises(ShardSpecError, match=msg):
        parse_shards(spec, 30, "torch")
