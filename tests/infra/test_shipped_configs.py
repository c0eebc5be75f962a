"""The shipped production configs fit together: the train job reads the cache the encode job writes."""

from __future__ import annotations

from pipelines.config import EncodeJobConfig
from services.config import load_config
from services.encoders.diffusers_configs import DIFFUSERS_AUTOENCODERS
from services.encoders.text import t5_base_config
from tests.infra.conftest import REPO
from trainer.config import TrainJobConfig
from trainer.models import resolve_config

ENCODE = REPO / "configs/encode/finet2i-dcae-t5.yaml"
TRAIN = REPO / "configs/train/hybriddit-148m.yaml"


def test_the_reference_train_config_reads_the_cache_of_the_reference_encode_config():
    encode = load_config(EncodeJobConfig, ENCODE)
    train = load_config(TrainJobConfig, TRAIN)
    assert encode.output.uri in train.data.uris
    model = resolve_config(train.model.preset)
    assert (encode.codec.name, encode.text.name) == ("dc-ae-f32c32-sana-1.1", "t5-base")
    assert model.latent_channels == DIFFUSERS_AUTOENCODERS[encode.codec.name].full_config["latent_channels"]
    assert model.text_dim == t5_base_config().d_model
