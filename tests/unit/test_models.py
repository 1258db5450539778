"""Model paths from outside are validated with errors naming the problem."""

import pytest

from featurewatch.capture.models import load_model, model_dims, resolve_model_path
from featurewatch.errors import ModelPathError


def test_valid_folder_loads(tiny_llama_dir, tmp_path):
    folder = resolve_model_path(str(tiny_llama_dir), tmp_path)
    assert model_dims(folder) == (64, 4)
    model, tok = load_model(folder)
    assert tok.padding_side == "left" and tok.pad_token is not None


def test_bad_paths(tmp_path):
    with pytest.raises(ModelPathError, match="does not exist"):
        resolve_model_path(str(tmp_path / "nope"), tmp_path)
    (tmp_path / "file").write_text("x")
    with pytest.raises(ModelPathError, match="not a folder"):
        resolve_model_path(str(tmp_path / "file"), tmp_path)
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelPathError, match="no config.json"):
        resolve_model_path(str(tmp_path / "empty"), tmp_path)
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "config.json").write_text("{not json")
    with pytest.raises(ModelPathError, match="not valid JSON"):
        resolve_model_path(str(tmp_path / "broken"), tmp_path)
    (tmp_path / "noweights").mkdir()
    (tmp_path / "noweights" / "config.json").write_text('{"model_type": "llama"}')
    with pytest.raises(ModelPathError, match="cannot load"):
        load_model(tmp_path / "noweights")
