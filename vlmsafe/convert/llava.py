"""Convert an original LLaVA checkpoint (liuhaotian v1.5 / v1.6) into a transformers LLaVA directory.

The most-cited LLaVA checkpoints (``liuhaotian/llava-v1.5-7b``, ``llava-v1.6-vicuna-7b`` ...) are
``LlavaLlamaForCausalLM`` / ``LlavaMistralForCausalLM`` models of the LLaVA repository, which
transformers does not ship: they cannot be loaded, steered or evaluated as they are, and their CLIP
tower is a separate download (``mm_vision_tower``). :func:`convert_llava` writes a
``LlavaForConditionalGeneration`` (v1.5) or ``LlavaNextForConditionalGeneration`` (v1.6, AnyRes)
directory -- config, weights, processor, chat template -- offline, tensor by tensor, atomically.

Mapping (the same as transformers' own ``convert_llava_weights_to_hf.py`` and
``convert_llava_next_weights_to_hf.py``; output in the llava-hf Hub layout, see
:mod:`vlmsafe.merge.keymap`):

* ``model.embed_tokens|layers.N|norm.*`` -> ``language_model.model.*``;
* ``lm_head.weight`` -> ``language_model.lm_head.weight``;
* ``model.mm_projector.0|2.*`` (``mlp2x_gelu``) -> ``multi_modal_projector.linear_1|linear_2.*``;
* ``model.image_newline`` (v1.6) -> ``image_newline``;
* ``model.vision_tower.vision_tower.vision_model.*`` (a fine-tuned tower, v1.6) ->
  ``vision_tower.vision_model.*``; otherwise the ``vision_model.*`` tensors of ``--vision``;
* ``*.rotary_emb.inv_freq`` (buffers) -> dropped (recomputed from the config).

Differences from the original code, all explicit: the tokenizer gains an ``<image>`` token (the
original splices image features in at the placeholder id -200 instead) and, if it has none, uses
``<unk>`` as its pad token as LLaVA's training did. New vocabulary rows of the embeddings and the LM
head are the *mean* of the existing rows (transformers' converter samples them around the mean):
the image token's embedding is replaced by image features anyway, and a mean LM-head row gives
every hidden state the mean of the original logits (up to rounding), below the best one, so greedy
decoding does not emit the new tokens. The CLIP weights are cast to the checkpoint's dtype, as LLaVA runs them.
``image_aspect_ratio: pad`` becomes ``LlavaImageProcessor(do_pad=True)`` (the original's pad-to-square
with the mean colour). The chat template is one of :mod:`vlmsafe.convert.templates`.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from vlmsafe.dtypes import dtype_name as canonical_dtype
from vlmsafe.dtypes import torch_dtype
from vlmsafe.errors import FileFormatError, InputError
from vlmsafe.io import atomic_path, check_output, write_json_atomic
from vlmsafe.merge import Checkpoint, is_buffer
from vlmsafe.merge.writer import OutputTensor, ShardedWriter, parse_size
from vlmsafe.reading import read_json
from vlmsafe.weights import check_no_remote_code

from .templates import DEFAULT_TEMPLATE, TEMPLATES

IMAGE_TOKEN = "<image>"
RECIPE_NAME = "vlmsafe_convert.json"
_ARCHITECTURES = {"LlavaLlamaForCausalLM": "llama", "LlavaMistralForCausalLM": "mistral"}
_VISION_PREFIX = "model.vision_tower.vision_tower.vision_model."
_VISION_PARTS = ("embeddings.", "encoder.", "pre_layrnorm.", "post_layernorm.")


@dataclass
class ConvertResult:
    """What :func:`convert_llava` wrote."""

    output: Path
    architecture: str
    added_tokens: list[str]
    vision_source: str
    dropped_buffers: int
    seconds: float


def convert_llava(
    original: str | os.PathLike[str],
    vision: str | os.PathLike[str],
    out: str | os.PathLike[str],
    *,
    dtype: str | None = None,
    chat_template: str | None = None,
    max_shard_size: str | int = "2GB",
    overwrite: bool = False,
    progress: bool = True,
) -> ConvertResult:
    """Convert the original-layout LLaVA in ``original`` (CLIP tower from ``vision``) into ``out``.

    Everything is checked before the output is created: the config (architecture, projector type,
    patch merge), the CLIP config, every tensor name and shape, the output path (an existing
    non-empty ``out`` is refused unless ``overwrite``).
    """
    from tqdm.auto import tqdm

    start = time.perf_counter()
    src, vis = Path(original), Path(vision)
    for p, what in ((src, "original LLaVA directory"), (vis, "`vision` CLIP directory")):
        if not p.is_dir():
            raise FileFormatError(f"{p}: no such {what}; pass the directory that holds config.json and the weights")
        check_no_remote_code(p, what)  # the original's tokenizer is loaded with transformers
    # an output that is, holds or lies in either input is refused (even with overwrite): it would replace them
    dest = check_output(out, kind="dir", overwrite=overwrite, inputs=(("`original`", src), ("`vision`", vis)))
    orig_cfg = read_json(src / "config.json", what="LLaVA config", fix="pass an original LLaVA checkpoint directory")
    spec = _spec(orig_cfg, src, dtype, chat_template)
    vision_cfg = _vision_config(vis)
    if vision_cfg.hidden_size != orig_cfg.get("mm_hidden_size", vision_cfg.hidden_size):
        raise InputError(
            f"`vision` {vis} has hidden size {vision_cfg.hidden_size} but {src} was trained on a tower of "
            f"{orig_cfg['mm_hidden_size']} (mm_vision_tower {orig_cfg.get('mm_vision_tower')!r}); pass that tower"
        )
    tokenizer, added = _tokenizer(src)
    text_cfg = _text_config(orig_cfg, spec["text"], max(int(orig_cfg["vocab_size"]), len(tokenizer)))
    hf_cfg = _hf_config(spec, text_cfg, vision_cfg, orig_cfg, tokenizer.convert_tokens_to_ids(IMAGE_TOKEN))
    processor = _processor(spec, vis, vision_cfg, tokenizer, orig_cfg)

    with Checkpoint(src, role="original LLaVA", hash_files=True) as ck, \
            Checkpoint(vis, role="`vision` CLIP", hash_files=True) as clip:
        plan, sources, dropped = _plan(ck, clip, spec, text_cfg, vision_cfg)
        with atomic_path(dest, overwrite=overwrite) as tmp:
            tmp.mkdir()
            writer = ShardedWriter(tmp, plan, max_shard_bytes=parse_size(max_shard_size),
                                   metadata={"vlmsafe_converted_from": "llava-original"})
            try:
                for t in tqdm(plan, desc="convert-llava", unit="tensor", disable=not progress):
                    ck_, name = sources[t.name]
                    tensor = (ck if ck_ == "orig" else clip).get(name)
                    if tensor.shape[0] < t.shape[0]:  # new token rows: the mean of the existing rows
                        mean = tensor.float().mean(dim=0, keepdim=True).to(tensor.dtype)
                        tensor = torch.cat([tensor, mean.expand(t.shape[0] - tensor.shape[0], -1)])
                    writer.write(t.name, tensor)
                writer.close()
            finally:
                writer.abort()
            hf_cfg.save_pretrained(tmp)
            processor.save_pretrained(tmp)
            if (src / "generation_config.json").is_file():
                (tmp / "generation_config.json").write_bytes((src / "generation_config.json").read_bytes())
            recipe = {
                "format": "vlmsafe-convert-recipe/1",
                "converted": "original LLaVA -> " + spec["arch"],
                "inputs": {"original": {"path": str(src.resolve()), "sha256": ck.file_hashes()},
                           "vision": {"path": str(vis.resolve()), "sha256": clip.file_hashes()}},
                "added_tokens": added,
                "vision_weights": spec["vision_source"],
                "dropped_buffers": dropped,
                "chat_template": spec["template"],
                "dtype": spec["dtype_name"],
            }
            write_json_atomic(tmp / RECIPE_NAME, recipe)
    return ConvertResult(dest, spec["arch"], added, spec["vision_source"], len(dropped), time.perf_counter() - start)


# -- configs --------------------------------------------------------------------------------


def _spec(cfg: dict[str, Any], src: Path, dtype: str | None, template: str | None) -> dict[str, Any]:
    """What to build, from the original config; every unsupported setting is an error here."""
    where = f"{src / 'config.json'}"
    arch = (cfg.get("architectures") or [None])[0]
    if arch not in _ARCHITECTURES:
        hint = (" (already a transformers LLaVA: no conversion needed)" if str(arch).startswith("Llava") and
                "ForConditionalGeneration" in str(arch) else "")
        raise InputError(
            f"{where}: architectures {cfg.get('architectures')!r} is not an original LLaVA model{hint}; "
            f"convert-llava reads {', '.join(_ARCHITECTURES)} checkpoints"
        )
    if cfg.get("mm_projector_type", "linear") != "mlp2x_gelu":
        raise InputError(f"{where}: mm_projector_type {cfg.get('mm_projector_type')!r} is not supported "
                         "(transformers' LLaVA projector is mlp2x_gelu: LLaVA-1.5 and later)")
    if cfg.get("mm_use_im_start_end") or cfg.get("mm_use_im_patch_token"):
        raise InputError(f"{where}: mm_use_im_start_end / mm_use_im_patch_token checkpoints (LLaVA v0/v1) are not "
                         "supported; convert a LLaVA-1.5 or 1.6 checkpoint")
    feature = cfg.get("mm_vision_select_feature", "patch")
    if feature not in ("patch", "cls_patch"):
        raise InputError(f"{where}: mm_vision_select_feature {feature!r} is not supported; use patch or cls_patch")
    anyres = "anyres" in str(cfg.get("image_aspect_ratio", ""))
    if anyres and cfg.get("mm_patch_merge_type", "spatial_unpad") != "spatial_unpad":
        raise InputError(f"{where}: mm_patch_merge_type {cfg.get('mm_patch_merge_type')!r} is not supported by "
                         "LlavaNextForConditionalGeneration (it implements spatial_unpad)")
    if anyres and not cfg.get("image_grid_pinpoints"):
        raise InputError(f"{where}: image_aspect_ratio anyres needs image_grid_pinpoints; the config is incomplete")
    text = _ARCHITECTURES[arch]
    template = template or DEFAULT_TEMPLATE[text]
    if template not in TEMPLATES:
        raise InputError(f"chat template {template!r} is unknown; choose one of {', '.join(TEMPLATES)}")
    dtype_name = dtype or str(cfg.get("torch_dtype") or cfg.get("dtype") or "float16")
    dtype_name = canonical_dtype(dtype_name, "dtype")
    return {"arch": "LlavaNextForConditionalGeneration" if anyres else "LlavaForConditionalGeneration",
            "text": text, "anyres": anyres, "strategy": "default" if feature == "patch" else "full",
            "template": template, "dtype_name": dtype_name, "dtype": torch_dtype(dtype_name), "vision_source": ""}


def _text_config(cfg: dict[str, Any], text: str, vocab_size: int):
    from transformers import LlamaConfig, MistralConfig

    cls = LlamaConfig if text == "llama" else MistralConfig
    allowed = (set(cls().to_dict()) | {"rope_theta", "rope_scaling", "sliding_window"}) - {
        "architectures", "model_type", "transformers_version", "_name_or_path", "dtype", "torch_dtype",
        "vocab_size", "tie_word_embeddings"}
    kwargs = {k: v for k, v in cfg.items() if k in allowed and not (k == "rope_scaling" and v is None)}
    return cls(**kwargs, vocab_size=vocab_size, tie_word_embeddings=False)


def _vision_config(vis: Path):
    from transformers import CLIPVisionConfig

    raw = read_json(vis / "config.json", what="CLIP config", fix="pass a CLIPModel or CLIPVisionModel directory")
    if raw.get("model_type") == "clip" and isinstance(raw.get("vision_config"), dict):
        raw = raw["vision_config"]
    elif raw.get("model_type") != "clip_vision_model":
        raise InputError(f"`vision` {vis}: model_type {raw.get('model_type')!r} is not a CLIP model; pass the "
                         "tower named by the checkpoint's mm_vision_tower (e.g. openai/clip-vit-large-patch14-336)")
    return CLIPVisionConfig(**{k: v for k, v in raw.items() if k not in ("model_type", "transformers_version")})


def _hf_config(spec: dict[str, Any], text_cfg, vision_cfg, cfg: dict[str, Any], image_token_id: int):
    from transformers import LlavaConfig, LlavaNextConfig

    patches = (vision_cfg.image_size // vision_cfg.patch_size) ** 2 + (spec["strategy"] == "full")
    common = dict(text_config=text_cfg, vision_config=vision_cfg, image_token_index=image_token_id,
                  projector_hidden_act="gelu", vision_feature_select_strategy=spec["strategy"],
                  vision_feature_layer=int(cfg.get("mm_vision_select_layer", -2)), multimodal_projector_bias=True,
                  tie_word_embeddings=False, image_seq_length=patches)
    if spec["anyres"]:
        out = LlavaNextConfig(**common, image_grid_pinpoints=cfg["image_grid_pinpoints"])
    else:
        out = LlavaConfig(**common)
    out.architectures = [spec["arch"]]
    out.dtype = spec["dtype_name"]
    return out


def _tokenizer(src: Path):
    from tokenizers import AddedToken
    from transformers import AutoTokenizer

    try:
        tok = AutoTokenizer.from_pretrained(src, trust_remote_code=False)
    except (OSError, ValueError) as exc:
        raise FileFormatError(f"{src}: cannot load its tokenizer ({exc}); the original directory must hold the "
                              "tokenizer files it was published with") from None
    added = []
    if IMAGE_TOKEN not in tok.get_vocab():
        tok.add_tokens([AddedToken(IMAGE_TOKEN, special=True, normalized=False)], special_tokens=True)
        added.append(IMAGE_TOKEN)
    if tok.pad_token is None:
        if tok.unk_token is not None:
            tok.pad_token = tok.unk_token  # what LLaVA's training code did
        else:
            tok.add_special_tokens({"pad_token": "<pad>"})
            added.append("<pad>")
    return tok, added


def _processor(spec: dict[str, Any], vis: Path, vision_cfg, tokenizer, cfg: dict[str, Any]):
    from transformers import LlavaImageProcessor, LlavaNextImageProcessor, LlavaNextProcessor, LlavaProcessor

    keys = ("do_resize", "size", "resample", "do_center_crop", "crop_size", "do_rescale", "rescale_factor",
            "do_normalize", "image_mean", "image_std", "do_convert_rgb")
    base: dict[str, Any] = {"size": {"shortest_edge": vision_cfg.image_size},
                            "crop_size": {"height": vision_cfg.image_size, "width": vision_cfg.image_size}}
    if (vis / "preprocessor_config.json").is_file():
        raw = read_json(vis / "preprocessor_config.json", what="image processor config")
        base.update({k: v for k, v in raw.items() if k in keys})
    if spec["anyres"]:
        image_processor = LlavaNextImageProcessor(**base, image_grid_pinpoints=cfg["image_grid_pinpoints"])
        cls = LlavaNextProcessor
    else:
        image_processor = LlavaImageProcessor(**base, do_pad=cfg.get("image_aspect_ratio") == "pad")
        cls = LlavaProcessor
    return cls(image_processor=image_processor, tokenizer=tokenizer, patch_size=vision_cfg.patch_size,
               vision_feature_select_strategy=spec["strategy"], chat_template=TEMPLATES[spec["template"]],
               image_token=IMAGE_TOKEN, num_additional_image_tokens=1)


# -- tensors --------------------------------------------------------------------------------


def _target(name: str) -> str | None:
    """The converted name of an original LM / projector / newline / tuned-tower tensor, else None."""
    if name.startswith("model.mm_projector."):
        rest = name[len("model.mm_projector."):]
        layer, _, param = rest.partition(".")
        return {"0": f"multi_modal_projector.linear_1.{param}", "2": f"multi_modal_projector.linear_2.{param}"}.get(
            layer)
    if name == "model.image_newline":
        return "image_newline"
    if name.startswith(_VISION_PREFIX):
        return "vision_tower.vision_model." + name[len(_VISION_PREFIX):]
    if name.startswith(("model.embed_tokens.", "model.layers.", "model.norm.")):
        return "language_model." + name
    if name.startswith("lm_head."):
        return "language_model." + name
    return None


def _plan(ck: Checkpoint, clip: Checkpoint, spec: dict[str, Any], text_cfg, vision_cfg):
    """Output tensors in order and where each comes from; one error lists every unknown or misshapen tensor."""
    problems, dropped = [], []
    sources: dict[str, tuple[str, str]] = {}
    for name in ck:
        if is_buffer(name):
            dropped.append(name)
            continue
        target = _target(name)
        if target is None:
            problems.append(f"{name}: not part of an original LLaVA-1.5/1.6 checkpoint")
        elif target == "image_newline" and not spec["anyres"]:
            problems.append(f"{name}: a LLaVA-NeXT tensor in a checkpoint whose config is not anyres")
        else:
            sources[target] = ("orig", name)
    tuned = any(t.startswith("vision_tower.") for t in sources)
    spec["vision_source"] = "original checkpoint (fine-tuned tower)" if tuned else f"--vision {clip.path}"
    if not tuned:
        for name in clip:
            key = name[len("vision_model."):] if name.startswith("vision_model.") else name
            if key.startswith(_VISION_PARTS) and not is_buffer(name):
                sources["vision_tower.vision_model." + key] = ("clip", name)
    if spec["anyres"] and "image_newline" not in sources:
        problems.append("model.image_newline: missing, but the config is LLaVA-NeXT (anyres)")
    layers = {int(t.split(".")[3]) for t in sources if t.startswith("language_model.model.layers.")}
    if layers != set(range(text_cfg.num_hidden_layers)):
        problems.append(f"decoder layers {sorted(layers)} do not match num_hidden_layers={text_cfg.num_hidden_layers}")
    if not any(t.startswith("vision_tower.") for t in sources):
        problems.append(f"no CLIP vision weights in {clip.path} (expected vision_model.* tensors)")
    h, v = text_cfg.hidden_size, vision_cfg.hidden_size
    expect = {"multi_modal_projector.linear_1.weight": (h, v), "multi_modal_projector.linear_2.weight": (h, h),
              "language_model.model.embed_tokens.weight": None, "language_model.lm_head.weight": None,
              "vision_tower.vision_model.embeddings.patch_embedding.weight":
                  (v, vision_cfg.num_channels, vision_cfg.patch_size, vision_cfg.patch_size)}
    plan = []
    for target, (which, name) in sources.items():
        info = (ck if which == "orig" else clip).info(name)
        shape = info.shape
        if target in ("language_model.model.embed_tokens.weight", "language_model.lm_head.weight"):
            if len(shape) != 2 or shape[1] != h or shape[0] > text_cfg.vocab_size:
                problems.append(f"{name}: shape {list(shape)}, expected [<= {text_cfg.vocab_size}, {h}]")
            shape = (text_cfg.vocab_size, h)
        elif expect.get(target) is not None and tuple(shape) != expect[target]:
            problems.append(f"{name}: shape {list(shape)}, expected {list(expect[target])}")
        dtype = spec["dtype"] if info.dtype.is_floating_point else info.dtype
        plan.append(OutputTensor(target, dtype, tuple(shape)))
    for required in expect:
        if required not in sources:
            problems.append(f"{required}: no source tensor (is this a complete LLaVA checkpoint?)")
    if problems:
        listed = "\n  ".join(problems[:12])
        raise FileFormatError(f"cannot convert {ck.path}: {len(problems)} problem(s):\n  {listed}\n"
                              "Pass a complete original LLaVA-1.5/1.6 checkpoint and its CLIP tower.")
    return plan, sources, dropped
