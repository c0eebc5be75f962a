import json

import pytest
from model_helpers import randomize_weights
from PIL import Image

from trainer.export import save_exported_model
from trainer.generate import main
from trainer.models import build_model, resolve_config

TEXT_ENCODER = {"name": "minilm", "tiny": True}


def tiny_checkpoint(directory, codec: str):
    """A HybridDiT-tiny export on 32-channel latents with the tiny MiniLM text encoder."""
    config = resolve_config("HybridDiT-tiny").model_copy(update={"latent_channels": 32})
    model = randomize_weights(build_model(config), std=0.02)
    return save_exported_model(directory, model, codec={"name": codec, "tiny": False}, text_encoder=TEXT_ENCODER)


def test_generate_writes_one_png_per_prompt_and_a_grid_with_taef2(tmp_path):
    checkpoint = tiny_checkpoint(tmp_path / "ckpt", "taef2")
    prompts_file = tmp_path / "prompts.txt"
    prompts_file.write_text("a red fox in snow\n\na lighthouse at dusk\n")
    out = tmp_path / "out"
    code = main(["--checkpoint", str(checkpoint), "--prompt", "a cat", "--prompts-file", str(prompts_file),
                 "--steps", "2", "--sampler", "euler", "--cfg", "2.0", "--size", "96x64", "--out", str(out)])
    assert code == 0
    pngs = sorted(p.name for p in out.glob("0*.png"))
    assert pngs == ["0000_a-cat.png", "0001_a-red-fox-in-snow.png", "0002_a-lighthouse-at-dusk.png"]
    assert Image.open(out / pngs[0]).size == (96, 64)
    assert Image.open(out / "grid.png").size == (2 * 96, 2 * 64)
    assert json.loads((out / "generation.json").read_text())["prompts"][0] == "a cat"


def test_generate_is_deterministic_for_a_seed(tmp_path):
    checkpoint = tiny_checkpoint(tmp_path / "ckpt", "taef2")
    for run in ("a", "b"):
        main(["--checkpoint", str(checkpoint), "--prompt", "a cat", "--steps", "1", "--seed", "3",
              "--out", str(tmp_path / run)])
    assert (tmp_path / "a" / "0000_a-cat.png").read_bytes() == (tmp_path / "b" / "0000_a-cat.png").read_bytes()


def test_generate_with_an_encoder_only_codec_fails_naming_the_codec(tmp_path, capsys):
    checkpoint = tiny_checkpoint(tmp_path / "ckpt", "taesana-encoder")
    code = main(["--checkpoint", str(checkpoint), "--prompt", "a cat", "--out", str(tmp_path / "out")])
    assert code == 2
    err = capsys.readouterr().err
    assert "'taesana-encoder'" in err and "no decoder" in err


def test_size_not_divisible_by_the_codec_downscale_is_rejected(tmp_path):
    checkpoint = tiny_checkpoint(tmp_path / "ckpt", "taef2")
    with pytest.raises(ValueError, match="multiple of 8"):
        main(["--checkpoint", str(checkpoint), "--prompt", "x", "--size", "100", "--out", str(tmp_path / "o")])


def test_the_in_memory_api_turns_prompts_into_images_without_touching_disk(tmp_path, monkeypatch):
    import torch

    from trainer.generation import build_text_to_image, generate_images
    from trainer.samplers import SamplerSettings

    monkeypatch.chdir(tmp_path)
    config = resolve_config("HybridDiT-tiny").model_copy(update={"latent_channels": 32})
    model = randomize_weights(build_model(config), std=0.02).eval()
    pipeline = build_text_to_image(model, {"name": "taef2", "tiny": False}, TEXT_ENCODER, torch.device("cpu"),
                                   "an in-memory model")
    settings = SamplerSettings(steps=2, sampler="euler", cfg=2.0, batch_size=2)
    images = generate_images(pipeline, ["a cat", "a dog", "a fox"], settings, size=(64, 96))
    assert images.shape == (3, 3, 64, 96) and images.dtype == torch.float32
    assert 0 <= float(images.min()) and float(images.max()) <= 1
    assert torch.equal(images, generate_images(pipeline, ["a cat", "a dog", "a fox"], settings, size=(64, 96)))
    assert list(tmp_path.iterdir()) == []


def test_a_resolution_aware_shift_samples_a_larger_size_with_the_shift_its_token_count_calls_for(tmp_path):
    import torch

    from trainer.generation import build_text_to_image, generate_images
    from trainer.samplers import SamplerSettings

    config = resolve_config("HybridDiT-tiny").model_copy(update={"latent_channels": 32})
    model = randomize_weights(build_model(config), std=0.02).eval()
    pipeline = build_text_to_image(model, {"name": "taef2", "tiny": False}, TEXT_ENCODER, torch.device("cpu"),
                                   "an in-memory model")
    base = dict(steps=2, sampler="euler", cfg=1.0)

    def images(size, **shift):
        return generate_images(pipeline, ["a cat"], SamplerSettings(**base, **shift), size=size)

    # 64 px = 8x8 latent = 64 tokens (patch 1); 128 px has 4x the tokens, so the shift doubles (sqrt 4)
    aware = dict(shift=1.5, shift_base_tokens=64)
    assert torch.equal(images((64, 64), **aware), images((64, 64), shift=1.5))
    assert torch.equal(images((128, 128), **aware), images((128, 128), shift=3.0))
    assert not torch.equal(images((128, 128), **aware), images((128, 128), shift=1.5))


@pytest.mark.parametrize("preset, pixel_stream", [("HybridDiT-tiny", False), ("HiDiT-tiny", True)])
def test_generation_runs_the_model_without_recording_gradients(preset, pixel_stream):
    """Every model call of a sampler runs with autograd off: with it on, each step's graph is kept alive through
    the next step's input, gigabytes for the demo's evaluation batches."""
    import torch

    from trainer.generation import build_text_to_image, generate_images
    from trainer.samplers import SamplerSettings

    model = build_model(resolve_config(preset).model_copy(update={"latent_channels": 32})).eval()
    grad_enabled = []
    model.register_forward_hook(lambda *_: grad_enabled.append(torch.is_grad_enabled()))
    pipeline = build_text_to_image(model, {"name": "taef2", "tiny": False}, TEXT_ENCODER, torch.device("cpu"), preset)
    settings = SamplerSettings(steps=4, sampler="heun", cfg=2.0, pixel_stream=pixel_stream)
    images = generate_images(pipeline, ["a cat", "a dog"], settings)
    assert images.shape == (2, 3, 64, 64)
    assert grad_enabled and not any(grad_enabled)
