"""``vlmsafe convert-llava``: original LLaVA checkpoints -> transformers LLaVA directories."""

from __future__ import annotations

import argparse

from vlmsafe.cli.options import (
    add_dtype_option,
    add_input,
    add_output_options,
    add_progress_option,
    check_command_output,
)
from vlmsafe.cli.parsing import add_command, add_parameter_flags
from vlmsafe.cli.types import size_arg

_EPILOG = """\
example:
  # liuhaotian/llava-v1.5-7b (pytorch_model-*.bin shards) + its CLIP tower, both downloaded beforehand
  vlmsafe convert-llava llava-v1.5-7b --vision clip-vit-large-patch14-336 --out llava-v1.5-7b-hf

The result loads with LlavaForConditionalGeneration (v1.5) or LlavaNextForConditionalGeneration
(v1.6, image_aspect_ratio anyres) and works with every vlmsafe command. Nothing is downloaded;
the output appears only when complete. Buffers (rotary inv_freq) are dropped, an <image> token is
added to the tokenizer, and the chat template follows the original conversation format (vicuna for
Llama models, mistral for Mistral; pass --chat-template chatml for llava-v1.6-34b).
"""


def register(subparsers: argparse._SubParsersAction) -> None:
    from vlmsafe.convert.templates import TEMPLATES

    p = add_command(
        subparsers, "convert-llava", _convert,
        help="convert an original LLaVA checkpoint (liuhaotian v1.5/v1.6) into a transformers LLaVA directory",
        description=(
            "Convert an original LLaVA checkpoint (LlavaLlamaForCausalLM / LlavaMistralForCausalLM: model.layers.*, "
            "model.mm_projector.*, .bin or safetensors) into a transformers LlavaForConditionalGeneration / "
            "LlavaNextForConditionalGeneration directory with config, processor and chat template, offline."
        ),
        epilog=_EPILOG,
    )
    add_input(p, "original", metavar="ORIGINAL_DIR", help="original LLaVA checkpoint directory (with tokenizer)")
    add_input(p, "--vision", required=True, metavar="CLIP_DIR",
              help="the CLIP tower named by the checkpoint's mm_vision_tower (CLIPModel or CLIPVisionModel "
                   "directory); its weights are used unless the checkpoint carries a fine-tuned tower")
    add_output_options(p, help="output directory (created atomically)")
    add_dtype_option(p, help="dtype of the written weights (default: the checkpoint's torch_dtype)")
    p.add_argument("--chat-template", choices=tuple(TEMPLATES),
                   help="conversation format (default: vicuna for Llama models, mistral for Mistral)")
    p.add_argument("--max-shard-size", type=size_arg, default="2GB", help="output shard size (default 2GB)")
    add_progress_option(p)
    add_parameter_flags(p, {"original": "ORIGINAL_DIR"})  # convert_llava(original, vision, out)


def _convert(args: argparse.Namespace) -> int:
    from vlmsafe.convert.llava import convert_llava

    check_command_output(args, args.out, kind="dir")  # before anything is read; convert_llava checks it again
    res = convert_llava(args.original, args.vision, args.out, dtype=args.dtype, chat_template=args.chat_template,
                        max_shard_size=args.max_shard_size, overwrite=args.overwrite, progress=not args.no_progress)
    extra = f", added tokens {res.added_tokens}" if res.added_tokens else ""
    print(f"converted to {res.architecture} (vision weights: {res.vision_source}; dropped {res.dropped_buffers} "
          f"buffers{extra}) in {res.seconds:.1f}s -> {res.output}")
    return 0
