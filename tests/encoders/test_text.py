"""Text encoders: real MiniLM semantics, real-token trimming, batch independence, options, describe()."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from services.encoders import TEXT_ENCODERS, EncoderError, build_text_encoder

PROMPTS = [
    "a photo of a cat sitting on a wooden table",
    "",
    "an astronaut floating above the earth, with a red rocket launching into a clear blue sky behind him",
]


@pytest.fixture(scope="module")
def minilm():
    return build_text_encoder("minilm")


def mean_pooled(states: torch.Tensor) -> torch.Tensor:
    return states.mean(dim=0)


def test_registry_holds_the_designed_text_encoders():
    assert set(TEXT_ENCODERS) == {"t5-base", "t5gemma", "minilm"}


def test_minilm_places_paraphrases_closer_than_unrelated_sentences(minilm):
    cat, kitten, rocket = minilm.encode(
        [
            "a cat is sleeping on the sofa",
            "a kitten naps on the couch",
            "the rocket engine exploded on the launch pad",
        ]
    )
    paraphrase = F.cosine_similarity(mean_pooled(cat), mean_pooled(kitten), dim=0)
    unrelated = F.cosine_similarity(mean_pooled(cat), mean_pooled(rocket), dim=0)
    assert paraphrase > unrelated + 0.2, (paraphrase.item(), unrelated.item())


def test_minilm_output_has_one_384_d_row_per_real_token(minilm):
    outputs = minilm.encode(PROMPTS)
    token_counts = [len(minilm.tokenizer(prompt)["input_ids"]) for prompt in PROMPTS]
    assert [tuple(output.shape) for output in outputs] == [(count, 384) for count in token_counts]
    assert minilm.spec.dim == 384
    assert token_counts[1] == 2  # the empty prompt is [CLS] [SEP]


@pytest.mark.parametrize("tiny", [True, False], ids=["tiny", "pretrained"])
def test_minilm_encodes_a_batch_like_each_prompt_alone(tiny, minilm):
    encoder = build_text_encoder("minilm", tiny=True) if tiny else minilm
    assert_batch_matches_single_prompts(encoder)


@pytest.mark.parametrize("name", ["t5-base", "t5gemma"])
def test_tiny_encoder_encodes_a_batch_like_each_prompt_alone(name):
    assert_batch_matches_single_prompts(build_text_encoder(name, tiny=True))


def assert_batch_matches_single_prompts(encoder) -> None:
    batched = encoder.encode(PROMPTS)
    for prompt, together in zip(PROMPTS, batched, strict=True):
        (alone,) = encoder.encode([prompt])
        assert together.shape == alone.shape
        assert F.cosine_similarity(together, alone, dim=-1).min() >= 0.999


@pytest.mark.parametrize("name", sorted(TEXT_ENCODERS))
def test_tiny_encoder_gives_fp32_rows_of_its_width_and_at_least_one_token_for_the_empty_prompt(name):
    encoder = build_text_encoder(name, tiny=True)
    outputs = encoder.encode(PROMPTS)
    assert all(output.dtype == torch.float32 and output.shape[1] == encoder.spec.dim for output in outputs)
    assert outputs[1].shape[0] >= 1
    assert outputs[0].shape[0] < outputs[2].shape[0]


def test_t5_empty_prompt_is_only_the_eos_token():
    encoder = build_text_encoder("t5-base", tiny=True)
    (null_text,) = encoder.encode([""])
    assert null_text.shape[0] == 1
    assert encoder.tokenizer("")["input_ids"] == [encoder.tokenizer.eos_token_id]


@pytest.mark.parametrize("name", sorted(TEXT_ENCODERS))
def test_max_length_truncates_long_prompts(name):
    encoder = build_text_encoder(name, tiny=True, max_length=6)
    outputs = encoder.encode(PROMPTS)
    assert outputs[2].shape[0] == 6
    assert encoder.spec.max_length == 6


@pytest.mark.parametrize("name", sorted(TEXT_ENCODERS))
def test_text_encoder_rebuilt_from_describe_encodes_identically(name):
    encoder = build_text_encoder(name, tiny=True, max_length=32)
    rebuilt = build_text_encoder(**encoder.describe())
    assert rebuilt.describe() == encoder.describe()
    for original, again in zip(encoder.encode(PROMPTS), rebuilt.encode(PROMPTS), strict=True):
        assert torch.equal(original, again)


def test_text_encoder_is_frozen_and_returns_ordinary_tensors():
    encoder = build_text_encoder("t5-base", tiny=True)
    assert not encoder.model.training
    assert not any(parameter.requires_grad for parameter in encoder.model.parameters())
    assert not encoder.encode(["a cat"])[0].is_inference()


def test_encode_rejects_a_single_string_instead_of_a_list():
    with pytest.raises(EncoderError, match="takes a list of prompts"):
        build_text_encoder("t5-base", tiny=True).encode("a cat")


def test_encode_of_no_prompts_is_an_empty_list():
    assert build_text_encoder("t5-base", tiny=True).encode([]) == []


def test_minilm_max_length_beyond_its_positions_is_rejected_naming_the_option():
    with pytest.raises(EncoderError, match=r"'minilm': invalid options \(max_length=1000"):
        build_text_encoder("minilm", max_length=1000)


def test_unknown_text_encoder_name_lists_the_known_ones():
    with pytest.raises(EncoderError, match="unknown text encoder 'clip'.*t5-base"):
        build_text_encoder("clip")


def test_full_t5_base_config_has_the_published_encoder_parameter_count():
    from transformers import T5EncoderModel

    from services.encoders.text import t5_base_config

    with torch.device("meta"):  # shapes only: no memory, no init time
        model = T5EncoderModel(t5_base_config())
    assert sum(p.numel() for p in model.parameters()) / 1e6 == pytest.approx(109.6, abs=0.1)


@pytest.mark.slow
def test_full_t5_base_architecture_encodes_768_d_rows():
    encoder = build_text_encoder("t5-base", random_init=True)
    outputs = encoder.encode(PROMPTS)
    assert encoder.spec.dim == 768
    assert [output.shape[1] for output in outputs] == [768, 768, 768]
