import json

import pytest
import torch
from model_helpers import random_inputs, randomize_weights

from trainer.export import (
    CONFIG_FILE,
    WEIGHTS_FILE,
    LatentNormalisation,
    load_exported_model,
    save_exported_model,
)
from trainer.models import build_model

CODEC = {"name": "taef2", "tiny": False}
TEXT = {"name": "minilm", "tiny": True}


def test_safetensors_export_round_trips_bit_exactly(tmp_path):
    model = randomize_weights(build_model("HybridDiT-tiny"))
    save_exported_model(tmp_path, model, codec=CODEC, text_encoder=TEXT,
                        latent_normalisation=LatentNormalisation(scale=0.5, shift=0.1))
    loaded, config = load_exported_model(tmp_path)
    original, restored = model.state_dict(), loaded.state_dict()
    assert original.keys() == restored.keys()
    assert all(torch.equal(original[name], restored[name]) for name in original)
    x, t, text, mask = random_inputs(model.config)
    with torch.no_grad():
        assert torch.equal(model.eval()(x, t, text, mask), loaded(x, t, text, mask))
    assert config.model == model.config and config.latent_normalisation.scale == 0.5


def test_config_json_records_model_codec_and_text_encoder(tmp_path):
    save_exported_model(tmp_path, build_model("LiT-tiny"), codec=CODEC, text_encoder=TEXT)
    written = json.loads((tmp_path / CONFIG_FILE).read_text())
    assert written["codec"] == CODEC and written["text_encoder"] == TEXT
    assert written["model"]["linear_heads"] == 2 and (tmp_path / WEIGHTS_FILE).exists()


def test_export_of_a_given_state_dict_writes_those_weights(tmp_path):
    model = build_model("HybridDiT-tiny")
    ema = {name: torch.full_like(tensor, 0.25) for name, tensor in model.state_dict().items()}
    save_exported_model(tmp_path, model, codec=CODEC, text_encoder=TEXT, state_dict=ema)
    loaded, _ = load_exported_model(tmp_path)
    assert all((tensor == 0.25).all() for tensor in loaded.state_dict().values())


def test_loading_a_dir_without_export_names_the_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError, match=CONFIG_FILE):
        load_exported_model(tmp_path)
