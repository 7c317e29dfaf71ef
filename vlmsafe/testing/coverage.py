"""The generic adapter's coverage of the installed transformers, and the README's support block.

:func:`walk` builds a tiny model of every image-text-to-text class transformers ships
(:func:`walk_image_text_to_text`, checked by ``tests/test_generic_adapter.py``);
:func:`coverage_section` states the counts, the coverage and every class the generic adapter refuses, leaves out
of scope or cannot build tiny, with the reason. :func:`readme_block` is the family table
(:func:`vlmsafe.adapters.support_table`, from the adapters themselves) followed by that section: the README block
between the SUPPORT-TABLE markers, which ``tests/test_readme.py`` keeps equal. It builds models with the test
kit, so it sits above the library (the library never imports :mod:`vlmsafe.testing`).

Regenerate the README block with ``python -m vlmsafe.cli.support_table --write README.md``.
"""

from __future__ import annotations

import contextlib
import functools
from pathlib import Path

import torch

from vlmsafe.adapters.support import support_table
from vlmsafe.reading import replace_marked_block

#: Small text widths for a real (not meta) forward of a default config cut to 2 layers.
SMALL_TEXT = dict(hidden_size=64, intermediate_size=128, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                  moe_intermediate_size=32, num_experts=4, num_local_experts=4, vocab_size=512)


def shrunk_config(config_class, narrow: bool = False):
    """``config_class()`` (the family's default architecture) with every sub-config cut to at most 2 layers
    (``num_hidden_layers`` / ``depth`` / ``num_layers``, with ``layer_types`` cut to match); ``narrow``: the text
    config's widths too (:data:`SMALL_TEXT`), for a forward on CPU."""
    config = config_class()
    for key, sub_class in getattr(config, "sub_configs", {}).items():
        if getattr(config, key, None) is None and isinstance(sub_class, type) and hasattr(sub_class, "model_type"):
            # a modality the default config leaves out (Gemma 4's vision tower): its default config (one that
            # cannot be built alone stays out)
            with contextlib.suppress(Exception):
                setattr(config, key, sub_class())
    subs = [config] + [getattr(config, k, None) for k in getattr(config, "sub_configs", {})]
    for sub in subs:
        try:
            width, heads = getattr(sub, "hidden_size", None), getattr(sub, "num_attention_heads", None)
        except Exception:  # per-layer attributes some configs refuse to read globally
            width = heads = None
        if isinstance(width, int) and isinstance(heads, int) and heads > 0 and width % heads:
            sub.num_attention_heads = max(h for h in range(1, heads + 1) if width % h == 0)  # Aya Vision's SigLIP
        for key in ("num_hidden_layers", "depth", "num_layers"):
            value = getattr(sub, key, None)
            if isinstance(value, int) and not isinstance(value, bool) and value > 2:
                setattr(sub, key, 2)
                for types_key in ("layer_types", "layers_block_type"):  # keep a full-attention layer
                    types = getattr(sub, types_key, None)
                    if isinstance(types, list) and len(types) > 2:
                        full = [t for t in types if "full" in str(t)]
                        cut = types[:2] if not full or full[0] in types[:2] else [types[0], full[0]]
                        setattr(sub, types_key, cut)
                if getattr(sub, "num_kv_shared_layers", 0):  # Gemma 3n: no layer left to share a cache with
                    sub.num_kv_shared_layers = 0
    if narrow:
        text = config.get_text_config()
        for key, value in SMALL_TEXT.items():
            try:
                current = getattr(text, key, None)
            except Exception:  # a per-layer attribute (Gemma 4's head_dim): left as is
                continue
            if isinstance(current, int):
                setattr(text, key, value)
        if isinstance(getattr(text, "word_embed_proj_dim", None), int):  # OPT (BLIP-2)
            text.word_embed_proj_dim = text.hidden_size
    return config


def walk_image_text_to_text(names=None, models=None):
    """Every image-text-to-text model class of the installed transformers, built from its shrunk default config
    on the ``meta`` device (structure only, no memory), and what vlmsafe makes of it.

    Returns rows ``(model_type, class name, status, detail)``; status is ``explicit`` (detail: the adapter),
    ``generic`` (detail: the decoder layers it chose), ``refused`` (detail: the reason), ``out of scope`` (not a
    decoder-only VLM: an encoder-decoder, or no vision input at all; detail: why, see
    :func:`vlmsafe.adapters.generic.out_of_scope`) or ``unbuildable`` (its default config cannot be built on the
    meta device; detail: the error). ``models``: a dict that receives the built (meta) models by model type, for
    structural checks.
    """
    import warnings

    import transformers
    from transformers.models.auto.modeling_auto import MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES

    from vlmsafe.adapters.base import adapter_class_for
    from vlmsafe.adapters.generic import GenericVLMAdapter, image_token_id, out_of_scope
    from vlmsafe.errors import UnsupportedModelError

    rows, seen = [], set()
    for model_type, class_name in sorted(MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES.items()):
        cls = getattr(transformers, class_name, None)
        if cls is None or class_name in seen or (names is not None and model_type not in names):
            continue
        seen.add(class_name)
        try:
            with torch.device("meta"), warnings.catch_warnings():
                warnings.simplefilter("ignore")
                model = cls(shrunk_config(cls.config_class))
        except Exception as exc:  # a default config that cannot be built is reported, not raised
            rows.append((model_type, class_name, "unbuildable", f"{type(exc).__name__}: {exc}".split("\n")[0]))
            continue
        if models is not None:
            models[model_type] = model
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                adapter = adapter_class_for(model)
        except UnsupportedModelError as exc:
            scope = out_of_scope(model)
            reason = scope or str(exc).split(". Supported classes")[0].split(f"(module {cls.__module__}). ")[-1]
            rows.append((model_type, class_name, "out of scope" if scope else "refused", reason))
            continue
        if issubclass(adapter, GenericVLMAdapter):
            token = "" if image_token_id(model.config) is not None else " (image token from the processor)"
            rows.append((model_type, class_name, "generic", adapter.layers_path + token))
        else:
            rows.append((model_type, class_name, "explicit", adapter.__name__))
    return rows


@functools.lru_cache(maxsize=1)
def walk() -> tuple[list[tuple[str, str, str, str]], dict]:
    """The walk over the installed transformers' image-text-to-text classes (rows, built meta models); once."""
    models: dict = {}
    rows = walk_image_text_to_text(models=models)
    return rows, models


def coverage(rows) -> tuple[int, int, float]:
    """``(generic, refused, share)``: the generic adapter's share of the decoder-only VLM classes that have no
    explicit adapter (out-of-scope and unbuildable classes are not counted)."""
    generic = sum(r[2] == "generic" for r in rows)
    refused = sum(r[2] == "refused" for r in rows)
    return generic, refused, generic / max(1, generic + refused)


def strict_coverage(rows) -> tuple[int, int, float]:
    """``(generic, not covered, share)`` counting every buildable class without an explicit adapter, the out-of-
    scope ones (encoder-decoders, models without image input) as not covered: the stricter reading."""
    generic = sum(r[2] == "generic" for r in rows)
    missed = sum(r[2] in ("refused", "out of scope") for r in rows)
    return generic, missed, generic / max(1, generic + missed)


def coverage_section(rows) -> str:
    """Markdown: what the walk found, the generic adapter's coverage, and every class it does not cover."""
    import transformers

    counts = {s: sum(r[2] == s for r in rows) for s in ("explicit", "generic", "refused", "out of scope",
                                                        "unbuildable")}
    generic, refused, share = coverage(rows)
    _, missed, strict = strict_coverage(rows)
    lines = [
        f"Every image-text-to-text model class of the installed transformers ({transformers.__version__}), built "
        f"from its default config shrunk to 2 layers: {len(rows)} classes; {counts['explicit']} explicit, "
        f"{counts['generic']} generic, {counts['refused']} refused, {counts['out of scope']} out of scope, "
        f"{counts['unbuildable']} whose default config does not build. The generic adapter covers {generic} of "
        f"the {generic + refused} decoder-only VLM classes without an explicit adapter ({share:.0%}); counting "
        f"the out-of-scope classes as uncovered too, {generic} of the {generic + missed} buildable classes without "
        f"an explicit adapter ({strict:.0%}). Out of scope, and not counted in the first share: encoder-decoders "
        "(their decoder reads the image through cross-attention to an encoder; no image positions, no text-only "
        "twin) and classes with neither a vision config nor an image "
        "token (text-only, protein-text and robot-action models listed under image-text-to-text). Generic: "
        + ", ".join(f"`{r[0]}`" for r in rows if r[2] == "generic") + ".",
        "",
        "| model type | class | status | why |",
        "|---|---|---|---|",
    ]
    for model_type, cls, status, detail in rows:
        if status in ("refused", "out of scope", "unbuildable"):
            lines.append(f"| `{model_type}` | `{cls}` | {status} | {detail.replace('|', '/')} |")
    return "\n".join(lines) + "\n"


def readme_block() -> str:
    """The family table, then the generic adapter's coverage of the installed transformers (the README block)."""
    return support_table() + "\n" + coverage_section(walk()[0])


START, END = "<!-- SUPPORT-TABLE-START -->\n", "\n<!-- SUPPORT-TABLE-END -->"


def write_readme(path: str | Path) -> None:
    """Replace the block between the SUPPORT-TABLE markers of ``path`` with :func:`readme_block`."""
    replace_marked_block(path, START, END, START + readme_block().strip() + END)
