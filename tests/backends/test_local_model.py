"""Which model a peer already has on disk (`backends.models.local_model`), before it asks the mesh."""

from __future__ import annotations

from backends.manifest import LocalCopy, build_manifest
from backends.models import local_model


def test_a_model_is_found_in_the_cache_as_a_path_or_as_a_copy_from_peers_and_else_not(
        tmp_path, monkeypatch, embedded_path) -> None:
    monkeypatch.setenv("TOGETHER_CACHE", str(tmp_path / "cache"))
    assert local_model("smollm2-135m") is None  # an empty cache: ask the mesh, then PyPI
    assert local_model(str(embedded_path)) == embedded_path  # a path is itself
    assert local_model(str(tmp_path / "gone.gguf")) is None

    # a copy from peers with its headers is used as it is (partial: its tensors come on demand)
    m = build_manifest(embedded_path, "smollm2-135m")
    copy = LocalCopy.of("smollm2-135m")
    copy.begin(m)
    assert local_model("smollm2-135m") is None  # headers not there yet: not usable
    with open(embedded_path, "rb") as src:
        for h in m.headers():
            src.seek(h.offset)
            copy.write(h.file, h.offset, src.read(h.length))
            assert copy.verify(h.name)
    copy.save()
    assert local_model("smollm2-135m") == copy.path

    # the embedded model's own file in the cache wins
    (tmp_path / "cache" / "models").mkdir(parents=True)
    (tmp_path / "cache" / "models" / embedded_path.name).symlink_to(embedded_path)
    assert local_model("smollm2-135m") == tmp_path / "cache" / "models" / embedded_path.name
