"""The families' tokenizers and chat templates, for the tiny models of :mod:`vlmsafe.testing.families`.

:func:`family_tokenizer` is a word-level tokenizer carrying a family's special tokens; :func:`published_template`
reads a family's published chat template byte for byte from ``tests/fixtures/templates/<family>/``
(:data:`PUBLISHED_TEMPLATE_DIR`); :func:`family_template` picks it or a builder's short sketch.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from vlmsafe.errors import InputError
from vlmsafe.testing import TEST_WORDS
from vlmsafe.testing.tokenization import BOS, EOS, PAD, TEMPLATE_WORDS, UNK

#: The published chat templates of the families, one folder each (``chat_template.json`` + ``SOURCE.md``).
PUBLISHED_TEMPLATE_DIR = Path(__file__).resolve().parents[2] / "tests" / "fixtures" / "templates"
TEMPLATES = ("published", "sketch")


def published_template(family: str, root: str | os.PathLike[str] | None = None) -> str:
    """The published chat template of ``family`` (byte for byte, see the folder's ``SOURCE.md``).

    ``root`` defaults to ``$VLMSAFE_TEMPLATE_FIXTURES`` or the checkout's ``tests/fixtures/templates``."""
    base = Path(root or os.environ.get("VLMSAFE_TEMPLATE_FIXTURES") or PUBLISHED_TEMPLATE_DIR)
    path = base / family / "chat_template.json"
    if not path.is_file():
        raise InputError(f"{path}: no published chat template there; pass template='sketch', or root= (or set "
                         "VLMSAFE_TEMPLATE_FIXTURES) to the tests/fixtures/templates folder of a vlmsafe checkout")
    return json.loads(path.read_text(encoding="utf-8"))["chat_template"]


def family_template(family: str, template: str, sketch: str | None) -> str | None:
    if template not in TEMPLATES:
        raise InputError(f"template must be one of {TEMPLATES}, got {template!r}")
    return published_template(family) if template == "published" else sketch


def family_tokenizer(special_tokens, named=None, *, chat_template=None, bos=BOS, eos=EOS, pad=PAD,
                     padding_side="left"):
    """A lower-casing word-level tokenizer (as :func:`vlmsafe.testing.tokenization.build_word_tokenizer`) whose
    pad/bos/eos are the family's own strings and whose ``named`` special tokens (``{"image_token":
    "<image>", "boi_token": ...}``) are attributes, as the families' processors read them."""
    named = dict(named or {})
    fixed = list(dict.fromkeys([pad, bos, eos, UNK, *special_tokens, *named.values()]))
    extra = sorted(({w.lower() for w in TEST_WORDS} | set(TEMPLATE_WORDS)) - set(fixed) - {""})
    vocab = {tok: i for i, tok in enumerate([*fixed, *extra])}
    tk = Tokenizer(models.WordLevel(vocab, unk_token=UNK))
    tk.normalizer = normalizers.Lowercase()
    tk.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Punctuation()])
    tk.decoder = decoders.WordPiece(prefix="##", cleanup=False)
    tok = PreTrainedTokenizerFast(
        tokenizer_object=tk, pad_token=pad, bos_token=bos, eos_token=eos, unk_token=UNK, padding_side=padding_side,
        model_max_length=512, extra_special_tokens=named or None,
    )
    specials = [t for t in fixed if t not in (pad, bos, eos, UNK)]
    if specials:
        tok.add_special_tokens({"additional_special_tokens": specials}, replace_extra_special_tokens=False)
    if chat_template is not None:
        tok.chat_template = chat_template
    return tok
