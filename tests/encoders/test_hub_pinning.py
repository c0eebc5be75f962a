"""Hub loads read a pinned commit, safetensors only (services/encoders/hub.py and every hub loader).

The end-to-end tests build encoders through the registry against a real Hugging Face cache on disk, in
offline mode, whose `main` points at other weights than the registered commit: the registry must load the
commit, and must refuse a checkpoint that is only a pickle.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from services.encoders import EncoderError, build_codec, build_text_encoder
from services.encoders.diffusers_configs import DIFFUSERS_AUTOENCODERS
from services.encoders.hub import COMMIT_PATTERN, HubModel, from_pretrained_kwargs
from services.encoders.text import FAMILIES

REPO = Path(__file__).resolve().parents[2]
COMMIT = "0123456789abcdef0123456789abcdef01234567"
OTHER_COMMIT = "fedcba9876543210fedcba9876543210fedcba98"


def test_hub_id_load_takes_the_commit_and_safetensors_only():
    assert from_pretrained_kwargs("codec 'x'", "org/model", COMMIT) == {
        "revision": COMMIT,
        "use_safetensors": True,
    }
    assert from_pretrained_kwargs("text encoder 'x'", "org/model", COMMIT, weights=False) == {
        "revision": COMMIT
    }


def test_local_directory_is_read_as_it_is_but_still_safetensors_only(tmp_path):
    assert from_pretrained_kwargs("codec 'x'", str(tmp_path), None) == {"use_safetensors": True}
    assert from_pretrained_kwargs("codec 'x'", str(tmp_path), None, weights=False) == {}
    with pytest.raises(EncoderError, match="revision=.* applies to hub ids, but .* is a local directory"):
        from_pretrained_kwargs("codec 'x'", str(tmp_path), COMMIT)


def test_hub_load_without_a_pinned_commit_is_refused_naming_the_model_and_the_fix():
    with pytest.raises(
        EncoderError, match=r"codec 'x': 'org/model' would be .* without a pinned commit.*revision="
    ):
        from_pretrained_kwargs("codec 'x'", "org/model", None)


def test_registered_commit_applies_to_the_registered_repository_only():
    hub = HubModel("org/model", revision=COMMIT)
    assert hub.pin(None, None) == ("org/model", COMMIT)
    assert hub.pin("org/model", OTHER_COMMIT) == ("org/model", OTHER_COMMIT)
    assert hub.pin("someone/else", None) == ("someone/else", None)


def test_every_registered_hub_model_has_a_full_commit_or_none():
    hubs = [entry.hub for entry in DIFFUSERS_AUTOENCODERS.values()] + [
        family.hub for family in FAMILIES.values()
    ]
    assert all(hub.revision is None or re.fullmatch(COMMIT_PATTERN, hub.revision) for hub in hubs)
    # The two whose commits were found recorded in public code: the default text encoder and the SD VAE.
    assert FAMILIES["t5-base"].hub.revision and DIFFUSERS_AUTOENCODERS["sd-vae"].hub.revision


@pytest.mark.parametrize(("build", "name"), [(build_codec, "dc-ae-f32c32-sana-1.1"), (build_codec, "flux1-vae"),
                                             (build_text_encoder, "t5gemma")])  # fmt: skip
def test_unpinned_registry_model_is_pinned_to_a_looked_up_commit_or_refused_naming_the_option(build, name):
    # No hub is reachable here: the lookup of the current commit fails, and the refusal says how to pin one.
    with pytest.raises(EncoderError, match=r"has no commit registered .* cannot be looked up .*revision="):
        build(name)


@pytest.mark.parametrize(("build", "name"), [(build_codec, "sd-vae"), (build_text_encoder, "t5-base")])
def test_a_moving_branch_is_not_a_revision(build, name):
    with pytest.raises(EncoderError, match=r"invalid options \(revision='main'"):
        build(name, revision="main")


def cache_snapshot(cache: Path, hub_id: str, commit: str) -> Path:
    """The directory a Hugging Face cache keeps `hub_id` at `commit` in."""
    return cache / f"models--{hub_id.replace('/', '--')}" / "snapshots" / commit


def point_main_at(cache: Path, hub_id: str, commit: str) -> None:
    refs = cache / f"models--{hub_id.replace('/', '--')}" / "refs"
    refs.mkdir(parents=True, exist_ok=True)
    (refs / "main").write_text(commit)


@pytest.fixture(scope="module")
def hub_cache(tmp_path_factory) -> Path:
    """A real HF cache: sd-vae-ft-mse and t5-base at their registered commits, different weights on `main`."""
    import diffusers
    from transformers import T5EncoderModel

    from services.encoders.text import tiny_t5_config
    from services.encoders.tiny_tokenizer import T5_STYLE, tiny_tokenizer

    cache = tmp_path_factory.mktemp("hf-cache")
    vae = DIFFUSERS_AUTOENCODERS["sd-vae"]
    for commit, scale in ((vae.hub.revision, 0.25), (OTHER_COMMIT, 0.5)):
        config = {**vae.tiny_config, "scaling_factor": scale}
        diffusers.AutoencoderKL(**config).save_pretrained(cache_snapshot(cache, vae.hub.hub_id, commit))
    point_main_at(cache, vae.hub.hub_id, OTHER_COMMIT)
    # Only a pickle at this commit: a safetensors-only load must refuse it.
    diffusers.AutoencoderKL(**vae.tiny_config).save_pretrained(
        cache_snapshot(cache, vae.hub.hub_id, COMMIT), safe_serialization=False
    )

    t5 = FAMILIES["t5-base"].hub
    tokenizer = tiny_tokenizer(T5_STYLE)
    for commit, width in ((t5.revision, 32), (OTHER_COMMIT, 48)):
        snapshot = cache_snapshot(cache, t5.hub_id, commit)
        config = tiny_t5_config(len(tokenizer))
        config.d_model = width
        T5EncoderModel(config).save_pretrained(snapshot)
        tokenizer.save_pretrained(snapshot)
    point_main_at(cache, t5.hub_id, OTHER_COMMIT)
    return cache


@pytest.fixture(scope="module")
def built_offline(hub_cache) -> dict:
    """Encoders built through the registry with the hub offline and `hub_cache` as the only cache.

    One subprocess for all of them (the hub settings are read at import; imports cost seconds here).
    """
    code = f"""
import json
from services.encoders import CodecError, build_codec, build_text_encoder
codec, text = build_codec("sd-vae"), build_text_encoder("t5-base")
given = build_codec("sd-vae", revision="{OTHER_COMMIT}")
try:
    build_codec("sd-vae", revision="{COMMIT}")
    refused = ""
except CodecError as exc:
    refused = str(exc)
print(json.dumps({{"scale": codec.spec.scale, "codec": codec.describe(), "width": text.spec.dim,
                  "text": text.describe(), "given_scale": given.spec.scale, "refused": refused}}))
"""
    env = {**os.environ, "HF_HUB_CACHE": str(hub_cache), "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    result = subprocess.run(
        [sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(result.stdout.strip().splitlines()[-1])


def test_registry_loads_the_registered_commit_not_main_and_records_it(built_offline):
    # The registered commits hold scale 0.25 and width 32; `main` holds 0.5 and 48.
    assert (built_offline["scale"], built_offline["width"]) == (0.25, 32)
    assert built_offline["codec"]["revision"] == DIFFUSERS_AUTOENCODERS["sd-vae"].hub.revision
    assert built_offline["text"]["revision"] == FAMILIES["t5-base"].hub.revision


def test_registry_loads_a_given_commit_and_refuses_a_pickle_only_checkpoint(built_offline):
    assert built_offline["given_scale"] == 0.5
    assert f"revision '{COMMIT}', safetensors only" in built_offline["refused"]
