"""Offline stand-ins for hub tokenizers: a small Unigram model trained in-process on caption-like text."""

from __future__ import annotations

import string
from dataclasses import dataclass
from functools import cache

from transformers import PreTrainedTokenizerFast

VOCAB_SIZE = 400
# Caption-like text so the vocabulary holds real word pieces; the character set makes any ASCII prompt
# tokenisable without falling back to <unk>.
CORPUS = [
    "a photo of a cat sitting on a wooden table next to a cup of coffee",
    "an astronaut in a white space suit floating above the earth",
    "a red rocket launching into a clear blue sky with clouds of smoke",
    "a watercolor painting of a mountain lake at sunrise, soft light",
    "close-up portrait of an old man with a grey beard, studio lighting",
    "a city street at night with neon signs reflected in the rain",
    "a bowl of fresh fruit: apples, oranges and green grapes",
    "two dogs running across a sandy beach towards the ocean waves",
    "an illustration of a castle on a hill under a starry sky",
    "a minimalist logo of a fox, flat design, orange and white",
    string.ascii_letters + string.digits + string.punctuation,
]


@dataclass(frozen=True)
class TokenizerStyle:
    """The special tokens of a model family, ids in list order, and how they wrap one prompt."""

    special_tokens: tuple[str, ...]
    template: str  # tokenizers TemplateProcessing syntax, e.g. "$A </s>"
    pad_token: str
    unk_token: str
    eos_token: str
    bos_token: str | None = None


T5_STYLE = TokenizerStyle(("<pad>", "</s>", "<unk>"), "$A </s>", "<pad>", "<unk>", "</s>")
GEMMA_STYLE = TokenizerStyle(
    ("<pad>", "<eos>", "<bos>", "<unk>"), "<bos> $A <eos>", "<pad>", "<unk>", "<eos>", bos_token="<bos>"
)


@cache
def tiny_tokenizer(style: TokenizerStyle) -> PreTrainedTokenizerFast:
    """A deterministic ~400-piece Unigram tokenizer with the special tokens and wrapping of `style`."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors, trainers

    tokenizer = Tokenizer(models.Unigram())
    tokenizer.pre_tokenizer = pre_tokenizers.Metaspace()
    trainer = trainers.UnigramTrainer(
        vocab_size=VOCAB_SIZE,
        special_tokens=list(style.special_tokens),
        unk_token=style.unk_token,
        show_progress=False,
    )
    tokenizer.train_from_iterator(CORPUS, trainer)
    tokenizer.post_processor = processors.TemplateProcessing(
        single=style.template,
        special_tokens=[(token, tokenizer.token_to_id(token)) for token in style.special_tokens],
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        pad_token=style.pad_token,
        unk_token=style.unk_token,
        eos_token=style.eos_token,
        bos_token=style.bos_token,
    )
