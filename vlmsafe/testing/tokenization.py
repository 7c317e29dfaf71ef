"""Offline word-level tokenizers with chat templates.

Real VLM tokenizers cannot be downloaded here, and tests and the bundled testbed need a tokenizer
that behaves like a real one: special tokens (pad/bos/eos, ``<image>``), a chat template consumed
by ``processor.apply_chat_template``, padding on either side, ``save_pretrained`` round trips.
A HF ``tokenizers`` WordLevel model wrapped in ``PreTrainedTokenizerFast`` gives exactly that.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence

from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers
from transformers import PreTrainedTokenizerFast

PAD, BOS, EOS, UNK = "<pad>", "<s>", "</s>", "<unk>"
IMAGE_TOKEN = "<image>"

#: llava-1.5 style template ("USER: <image>\n{prompt} ASSISTANT:"), tokenizer-agnostic.
LLAVA_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] == 'system' %}"
    "{{ message['content'][0]['text'] if message['content'] is not string else message['content'] }} "
    "{% elif message['role'] == 'user' %}USER: "
    "{% if message['content'] is string %}{{ message['content'] }} "
    "{% else %}{% for c in message['content'] %}{% if c['type'] == 'image' %}<image> {% endif %}{% endfor %}"
    "{% for c in message['content'] %}{% if c['type'] == 'text' %}{{ c['text'] }} {% endif %}{% endfor %}{% endif %}"
    "{% else %}ASSISTANT: "
    "{% if message['content'] is string %}{{ message['content'] }}{% else %}"
    "{% for c in message['content'] %}{% if c['type'] == 'text' %}{{ c['text'] }}{% endif %}{% endfor %}{% endif %}"
    " </s> {% endif %}{% endfor %}"
    "{% if add_generation_prompt %}ASSISTANT:{% endif %}"
)

#: Qwen2-VL style template (``<|im_start|>`` turns, ``<|vision_start|><|image_pad|><|vision_end|>``).
QWEN2VL_CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|> {{ message['role'] }} "
    "{% if message['content'] is string %}{{ message['content'] }} "
    "{% else %}{% for c in message['content'] %}"
    "{% if c['type'] == 'image' %}<|vision_start|> <|image_pad|> <|vision_end|> "
    "{% elif c['type'] == 'text' %}{{ c['text'] }} {% endif %}{% endfor %}{% endif %}"
    "<|im_end|> {% endfor %}{% if add_generation_prompt %}<|im_start|> assistant{% endif %}"
)

QWEN2VL_SPECIAL_TOKENS = ("<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>", "<|image_pad|>",
                          "<|video_pad|>")

#: Words the chat templates above emit; always in the vocabulary.
TEMPLATE_WORDS = ("user", "assistant", "system", ":", "\n")

_WORD_RE = re.compile(r"<[^>\s]+>|\w+|[^\w\s]")


def split_words(text: str) -> list[str]:
    """Split text the way the word-level tokenizer does (words, punctuation, ``<special>`` tokens)."""
    return _WORD_RE.findall(text.lower())


def build_word_tokenizer(
    words: Iterable[str],
    *,
    special_tokens: Sequence[str] = (IMAGE_TOKEN,),
    chat_template: str | None = LLAVA_CHAT_TEMPLATE,
    padding_side: str = "left",
    model_max_length: int = 512,
    image_token: str | None = IMAGE_TOKEN,
) -> PreTrainedTokenizerFast:
    """Build a lower-casing word-level tokenizer over ``words``.

    Ids 0-3 are ``<pad> <s> </s> <unk>``, then ``special_tokens`` in order, then the words sorted,
    so the vocabulary is deterministic for a given word set. Unknown words map to ``<unk>``.
    """
    fixed = [PAD, BOS, EOS, UNK, *special_tokens]
    extra = sorted(({w.lower() for w in words} | set(TEMPLATE_WORDS)) - set(fixed) - {""})
    vocab = {tok: i for i, tok in enumerate([*fixed, *extra])}
    tk = Tokenizer(models.WordLevel(vocab, unk_token=UNK))
    tk.normalizer = normalizers.Lowercase()
    tk.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Punctuation()])
    tk.decoder = decoders.WordPiece(prefix="##", cleanup=False)
    kwargs = {}
    if image_token is not None:
        kwargs["extra_special_tokens"] = {"image_token": image_token}
    tok = PreTrainedTokenizerFast(
        tokenizer_object=tk,
        pad_token=PAD,
        bos_token=BOS,
        eos_token=EOS,
        unk_token=UNK,
        padding_side=padding_side,
        model_max_length=model_max_length,
        **kwargs,
    )
    if special_tokens:
        tok.add_special_tokens({"additional_special_tokens": list(special_tokens)}, replace_extra_special_tokens=False)
    if chat_template is not None:
        tok.chat_template = chat_template
    return tok
