"""A run in pictures: progress.png from its sample grids, val_loss.png from its validations, next to the checkpoints."""

from __future__ import annotations

import io

import pytest
import torch
from PIL import Image

from pipelines.demo.synthetic_cache import write_tiny_cache
from services import storage
from trainer.config import TrainJobConfig
from trainer.evaluation.progress import MARGIN, MIN_TILE, progress_image, sample_rows, shared_words
from trainer.inputs import resolve_cache
from trainer.loop import TrainingRun
from trainer.validation import PROGRESS_IMAGE, VALIDATION_FILE, VALIDATION_PLOT, RunPictures

PROMPTS = ["a red square", "a blue circle"]


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    """A 4-step run of the tiny model (16 px images through the pixel codec) sampling and validating every 2 steps."""
    root = tmp_path_factory.mktemp("run")
    cache = str(root / "pixel-cache")
    write_tiny_cache(cache, shard_sizes=[8, 8, 8], channels=12, codec={"name": "pixel", "tiny": False, "factor": 2},
                     text_encoder={"name": "minilm", "tiny": True, "max_length": 256})
    config = TrainJobConfig.model_validate(dict(
        run_name="pictures", data=dict(uris=[cache], shuffle_window_shards=2),
        model=dict(preset="HybridDiT-tiny", overrides={"latent_channels": 12}), batch_size=8, max_steps=4,
        report_every=2, checkpoint=dict(uri=str(root / "ckpt"), every_steps=4),
        validation=dict(holdout_shards=1, t_grid=[0.2, 0.8], every_steps=2, max_batches=1),
        samples=dict(prompts=PROMPTS, every_steps=2, steps=2)))
    TrainingRun(config, resolve_cache(config)).run()
    return root / "ckpt"


def test_the_progress_image_has_a_row_per_sampled_step_and_a_column_per_prompt(finished_run):
    rows = sample_rows(str(finished_run / "samples"))
    assert list(rows) == [2, 4] and [len(images) for images in rows.values()] == [2, 2]
    tile = MIN_TILE  # 16 px samples enlarged 4x
    image = Image.open(finished_run / PROGRESS_IMAGE)
    assert image.width > 2 * tile and 2 * tile < image.height < 3 * tile + 60  # two rows under a header
    # the newest row holds the step-4 samples themselves (nearest-neighbour enlarged)
    newest = rows[4][1].resize((tile, tile), Image.Resampling.NEAREST)
    right, bottom = image.width - 2 * MARGIN, image.height - 2 * MARGIN  # the last tile, inside the margins
    assert image.crop((right - tile, bottom - tile, right, bottom)).tobytes() == newest.tobytes()


def test_val_loss_history_holds_each_validation_per_t_bin_and_is_plotted(finished_run):
    history = storage.read_json(str(finished_run / VALIDATION_FILE))
    assert [entry["step"] for entry in history] == [2, 4]
    assert all(set(entry) == {"step", "val_loss", "val_loss_t0.20", "val_loss_t0.80"} for entry in history)
    assert Image.open(finished_run / VALIDATION_PLOT).size[0] > 300


def test_a_resumed_run_replaces_the_validations_from_its_step_on(tmp_path):
    pictures = RunPictures(str(tmp_path), PROMPTS, "resumed")
    for step, loss in ((2, 1.0), (4, 0.9), (6, 0.8)):
        pictures.record_validation(step, {"val_loss_t0.50": loss, "val_loss": loss})
    pictures.record_validation(4, {"val_loss_t0.50": 0.85, "val_loss": 0.85})  # resumed from step 2's checkpoint
    history = storage.read_json(str(tmp_path / VALIDATION_FILE))
    assert [(entry["step"], entry["val_loss"]) for entry in history] == [(2, 1.0), (4, 0.85)]


def test_prompts_sharing_their_first_words_are_headed_by_what_differs():
    assert shared_words(["a handwritten digit 0", "a handwritten digit 1"]) == ("a handwritten digit", ["0", "1"])
    assert shared_words(["Chelsea the cat", "a temple"]) == ("", ["Chelsea the cat", "a temple"])


def test_a_run_without_sample_grids_has_no_progress_image_to_make():
    with pytest.raises(ValueError, match="samples.prompts"):
        progress_image({}, PROMPTS)


def test_the_pictures_of_a_run_on_s3_are_drawn_from_its_grids_and_validations_there(s3_server):
    from trainer.generation import write_images

    root = s3_server.uri("pictures", "run")
    for step in (5, 10):
        images = torch.full((2, 3, 16, 16), step / 25)  # grey tiles: 0.2 at step 5, 0.4 at step 10
        write_images(storage.join(root, "samples", f"step_{step:07d}"), PROMPTS, images)
    pictures = RunPictures(root, PROMPTS, "s3-run")
    pictures.record_validation(5, {"val_loss_t0.50": 1.0, "val_loss": 1.0})
    pictures.record_validation(10, {"val_loss_t0.50": 0.5, "val_loss": 0.5})
    assert [entry["step"] for entry in storage.read_json(storage.join(root, VALIDATION_FILE))] == [5, 10]
    progress = Image.open(io.BytesIO(storage.read_bytes(pictures.assemble_progress())))
    assert list(sample_rows(storage.join(root, "samples"))) == [5, 10]
    right, bottom = progress.width - 2 * MARGIN - 1, progress.height - 2 * MARGIN - 1
    assert progress.getpixel((right, bottom)) == (102, 102, 102)  # the newest row's last tile: step 10's 0.4
    assert Image.open(io.BytesIO(storage.read_bytes(storage.join(root, VALIDATION_PLOT)))).size[0] > 300
