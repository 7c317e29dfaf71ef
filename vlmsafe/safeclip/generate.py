"""``vlmsafe safeclip generate``: images from your own diffusers pipeline with a Safe-CLIP text encoder.

The Safe-CLIP paper's text-to-image use (Poppi et al., ECCV 2024, Sec. 5.3): replace a Stable
Diffusion pipeline's CLIP text encoder with the Safe-CLIP one, keep everything else. This command
does that for pipelines saved in the diffusers layout -- SD 1.x/2.x (``text_encoder``) and SDXL
(``text_encoder`` + ``text_encoder_2``) -- through :func:`~vlmsafe.safeclip.integrations.apply_safe_text_encoder`,
and writes the images plus ``generations.json`` (which prompt, seed and text encoder made each file).

With ``--also-original`` every prompt is also generated with the pipeline's own encoder(s) from the
same starting noise (prompt ``i``, image ``j`` uses seed ``--seed + i * images_per_prompt + j``), so
the two folders compare image for image.

Everything the command can check is checked before the pipeline is loaded: the numbers, the prompt
file, the output folder, the pipeline layout and that each Safe-CLIP text tower has the architecture
of the encoder it replaces.
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path
from typing import Any, Optional, Sequence

from vlmsafe.errors import FileFormatError, InputError

_EPILOG = """\
prompts: a .jsonl/.json file of records with a "prompt" field (optional "id"), or a text file with
one prompt per line.

examples:
  vlmsafe safeclip generate --pipeline sd-v1-4/ --text-encoder safe-clip/model --prompts prompts.txt --out gen/
  vlmsafe safeclip generate --pipeline sdxl/ --text-encoder safe-l/model --text-encoder-2 safe-bigg/model \\
      --prompts prompts.jsonl --out gen/ --also-original --steps 30 --guidance 7.0
  vlmsafe safeclip generate --pipeline assets/t2i/pipeline --text-encoder assets/safeclip/safe \\
      --prompts prompts.txt --out gen/ --also-original --steps 10 --guidance 4   # the bundled testbed

Output: OUT/safe/<n>.png (and OUT/original/<n>.png), OUT/generations.json.
"""

SAFE, ORIGINAL, RECORD_FILE = "safe", "original", "generations.json"


def register_generate(subparsers: Any) -> None:
    """Add ``generate`` to the ``vlmsafe safeclip`` subcommands."""
    from vlmsafe.cli_options import add_output_options, add_progress_option
    from vlmsafe.validation import float_arg, int_arg

    g = subparsers.add_parser(
        "generate",
        help="text-to-image with a Safe-CLIP text encoder swapped into your diffusers pipeline (SD 1.x/2.x, SDXL)",
        description="Generate images from a diffusers text-to-image pipeline whose text encoder(s) are replaced by Safe-CLIP's.",
        epilog=_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    g.add_argument("--pipeline", required=True, metavar="DIR", help="a diffusers pipeline folder (model_index.json), e.g. Stable Diffusion v1.4 or SDXL")
    g.add_argument("--text-encoder", required=True, metavar="SAFE_DIR", help="Safe-CLIP model folder (OUTPUT_DIR/model of `safeclip train`) replacing text_encoder")
    te2 = g.add_mutually_exclusive_group()
    te2.add_argument("--text-encoder-2", metavar="SAFE_DIR", help="SDXL: Safe-CLIP model fine-tuned from the pipeline's second CLIP, replacing text_encoder_2")
    te2.add_argument("--keep-text-encoder-2", action="store_true", help="SDXL: replace text_encoder only and keep the original text_encoder_2 (it still carries unsafe concepts)")
    g.add_argument("--prompts", required=True, metavar="FILE", help="JSONL/JSON records with 'prompt', or a text file with one prompt per line")
    add_output_options(g, help="output folder (images + generations.json)")
    g.add_argument("--also-original", action="store_true", help="also generate every prompt with the pipeline's own text encoder(s), from the same noise")
    g.add_argument("--steps", type=int_arg(low=1), default=30, metavar="N", help="denoising steps (default 30)")
    g.add_argument("--guidance", type=float_arg(low=0), default=7.5, metavar="G", help="classifier-free guidance scale (default 7.5; <= 1 disables guidance)")
    g.add_argument("--seed", type=int_arg(low=0), default=0, help="seed of the first image; image k uses seed + k (default 0)")
    g.add_argument("--images-per-prompt", type=int_arg(low=1), default=1, metavar="N")
    g.add_argument("--height", type=int_arg(low=8), default=None, help="image height in pixels, a multiple of 8 (default: the pipeline's)")
    g.add_argument("--width", type=int_arg(low=8), default=None, help="image width in pixels, a multiple of 8 (default: the pipeline's)")
    g.add_argument("--negative-prompt", default=None, help="negative prompt for every image")
    g.add_argument("--batch-size", type=int_arg(low=1), default=4, metavar="N", help="prompts per pipeline call (default 4)")
    g.add_argument("--dtype", choices=("float32", "float16", "bfloat16"), default="float32", help="weights dtype (default float32)")
    g.add_argument("--device", default="cpu", help="torch device, e.g. cuda, cuda:1 (default cpu)")
    add_progress_option(g)
    g.set_defaults(func=_generate_cmd)


# ---------------------------------------------------------------------------------- inputs


def read_prompts(path: str | os.PathLike[str]) -> list[dict[str, str]]:
    """``[{"id", "prompt"}]`` from JSONL/JSON records (``prompt`` field) or a text file (one per line)."""
    from vlmsafe.data import read_records

    p = Path(path)
    if p.suffix.lower() in (".jsonl", ".json"):
        out = []
        for i, (where, rec) in enumerate(read_records(p, what="prompt file")):
            text = rec.get("prompt")
            if not isinstance(text, str) or not text.strip():
                raise FileFormatError(f"{where}: no 'prompt' text in this record; give every record a non-empty \"prompt\" string")
            out.append({"id": str(rec.get("id", i)), "prompt": text})
        return out
    if not p.is_file():
        raise FileFormatError(f"{p}: prompt file does not exist; pass a .txt file (one prompt per line) or JSONL with 'prompt'")
    try:
        lines = [line.strip() for line in p.read_text(encoding="utf-8").splitlines()]
    except UnicodeDecodeError as exc:
        raise FileFormatError(f"{p}: not UTF-8 text ({exc.reason}); save the prompts as UTF-8") from None
    out = [{"id": str(i), "prompt": line} for i, line in enumerate(x for x in lines if x)]
    if not out:
        raise FileFormatError(f"{p}: no prompts in the file; write one prompt per line")
    return out


def _pipeline_index(pipeline: str | os.PathLike[str]) -> dict[str, Any]:
    from vlmsafe.io import read_json

    p = Path(pipeline)
    index = read_json(p / "model_index.json", what="diffusers pipeline index", fix="pass a folder written by DiffusionPipeline.save_pretrained (it holds model_index.json)")
    if not isinstance(index.get("text_encoder"), list) or index["text_encoder"][0] is None:
        raise InputError(f"--pipeline {p}: the pipeline has no text_encoder ({index.get('_class_name')}); pass a Stable Diffusion / SDXL text-to-image pipeline")
    return index


def check_encoder_fits(safe_dir: str | os.PathLike[str], encoder_dir: str | os.PathLike[str], option: str) -> None:
    """Compare a Safe-CLIP checkpoint's text config with a pipeline encoder's config.json (no weights loaded)."""
    from vlmsafe.io import read_json
    from vlmsafe.safeclip.integrations import _TEXT_FIELDS

    safe = read_json(Path(safe_dir) / "config.json", what="Safe-CLIP model config", fix=f"pass to {option} the folder written by `vlmsafe safeclip train` (OUTPUT_DIR/model)")
    text = safe.get("text_config")
    if not isinstance(text, dict):
        raise FileFormatError(f"{option} {safe_dir}: config.json is not a CLIPModel config (no text_config); pass the Safe-CLIP model folder")
    mine = read_json(Path(encoder_dir) / "config.json", what="pipeline text encoder config")
    diff = [f"{k}: {text.get(k)} vs the pipeline's {mine.get(k)}" for k in _TEXT_FIELDS if k in mine and text.get(k) != mine.get(k)]
    if diff:
        raise InputError(f"{option} {safe_dir}: its text tower does not fit {Path(encoder_dir).name} ({'; '.join(diff)}); fine-tune Safe-CLIP from the CLIP this pipeline uses")


def _check_size(value: Optional[int], option: str) -> None:
    if value is not None and value % 8:
        raise InputError(f"{option} {value} is not a multiple of 8; diffusers pipelines need e.g. {value - value % 8 or 8}")


# ---------------------------------------------------------------------------------- run


def generate_images(
    pipe: Any,
    prompts: Sequence[dict[str, str]],
    *,
    steps: int,
    guidance: float,
    seed: int,
    images_per_prompt: int = 1,
    batch_size: int = 4,
    height: Optional[int] = None,
    width: Optional[int] = None,
    negative_prompt: Optional[str] = None,
    progress: bool = False,
) -> list[Any]:
    """PIL images, ``images_per_prompt`` per prompt in prompt order; image ``k`` starts from seed ``seed + k``."""
    import torch
    from tqdm.auto import tqdm

    out = []
    for start in tqdm(range(0, len(prompts), batch_size), desc="generate", disable=not progress):
        chunk = [p["prompt"] for p in prompts[start : start + batch_size]]
        first = seed + start * images_per_prompt
        gens = [torch.Generator().manual_seed(first + k) for k in range(len(chunk) * images_per_prompt)]
        kwargs: dict[str, Any] = {"num_inference_steps": steps, "guidance_scale": guidance, "generator": gens, "num_images_per_prompt": images_per_prompt}
        if height is not None:
            kwargs["height"] = height
        if width is not None:
            kwargs["width"] = width
        if negative_prompt is not None:
            kwargs["negative_prompt"] = [negative_prompt] * len(chunk)
        out.extend(pipe(chunk, **kwargs).images)
    return out


def _generate_cmd(args: argparse.Namespace) -> int:
    import json

    import torch

    from vlmsafe.io import atomic_path, check_output, sha256_file
    from vlmsafe.safeclip.integrations import apply_safe_text_encoder

    # --- everything checkable before loading anything heavy
    _check_size(args.height, "--height")
    _check_size(args.width, "--width")
    out = check_output(args.out, kind="dir", overwrite=args.overwrite)
    prompts = read_prompts(args.prompts)
    index = _pipeline_index(args.pipeline)
    pipe_dir = Path(args.pipeline)
    check_encoder_fits(args.text_encoder, pipe_dir / "text_encoder", "--text-encoder")
    has_second = isinstance(index.get("text_encoder_2"), list) and index["text_encoder_2"][0] is not None
    if has_second and not (args.text_encoder_2 or args.keep_text_encoder_2):
        raise InputError(
            f"--pipeline {pipe_dir} has a second text encoder (SDXL); pass --text-encoder-2 SAFE_DIR (Safe-CLIP fine-tuned from "
            "that CLIP) or --keep-text-encoder-2 to replace only the first one (the second still carries unsafe concepts)"
        )
    if args.text_encoder_2:
        if not has_second:
            raise InputError(f"--text-encoder-2 was given but {pipe_dir} has no text_encoder_2 (only SDXL-style pipelines do); drop it")
        check_encoder_fits(args.text_encoder_2, pipe_dir / "text_encoder_2", "--text-encoder-2")

    from diffusers import DiffusionPipeline

    dtype = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}[args.dtype]
    try:
        pipe = DiffusionPipeline.from_pretrained(str(pipe_dir), torch_dtype=dtype).to(args.device)
    except (OSError, ValueError) as exc:
        raise FileFormatError(f"--pipeline {pipe_dir}: cannot load the diffusers pipeline ({str(exc).splitlines()[0]}); pass a complete pipeline folder") from exc
    pipe.set_progress_bar_config(disable=True)
    settings = {"steps": args.steps, "guidance": args.guidance, "seed": args.seed, "images_per_prompt": args.images_per_prompt,
                "batch_size": args.batch_size, "height": args.height, "width": args.width, "negative_prompt": args.negative_prompt}  # fmt: skip
    gen_kwargs = {k: v for k, v in settings.items()}
    runs: dict[str, list[Any]] = {}
    encoders: dict[str, dict[str, Any]] = {}
    t0 = time.time()
    if args.also_original:
        runs[ORIGINAL] = generate_images(pipe, prompts, progress=not args.no_progress, **gen_kwargs)
        encoders[ORIGINAL] = {"text_encoder": str(pipe_dir / "text_encoder"), **({"text_encoder_2": str(pipe_dir / "text_encoder_2")} if has_second else {})}
    apply_safe_text_encoder(pipe, args.text_encoder, path_2=args.text_encoder_2)
    runs[SAFE] = generate_images(pipe, prompts, progress=not args.no_progress, **gen_kwargs)
    encoders[SAFE] = {"text_encoder": str(args.text_encoder), "text_encoder_sha256": _weights_digest(args.text_encoder, sha256_file)}
    if has_second:
        encoders[SAFE]["text_encoder_2"] = str(args.text_encoder_2 or pipe_dir / "text_encoder_2")
        if args.text_encoder_2:
            encoders[SAFE]["text_encoder_2_sha256"] = _weights_digest(args.text_encoder_2, sha256_file)

    n = args.images_per_prompt
    images = []
    with atomic_path(out, overwrite=args.overwrite) as tmp:
        tmp.mkdir()
        for name, imgs in runs.items():
            (tmp / name).mkdir()
            for k, img in enumerate(imgs):
                i, j = divmod(k, n)
                rel = f"{name}/{k:05d}.png"
                img.save(tmp / rel)
                images.append({"file": rel, "encoder": name, "prompt_id": prompts[i]["id"], "prompt": prompts[i]["prompt"], "image_index": j, "seed": args.seed + k})
        record = {
            "pipeline": str(pipe_dir),
            "pipeline_class": type(pipe).__name__,
            "prompts_file": str(args.prompts),
            "encoders": encoders,
            "settings": {**settings, "dtype": args.dtype, "device": args.device},
            "seconds": round(time.time() - t0, 2),
            "images": images,
        }
        (tmp / RECORD_FILE).write_text(json.dumps(record, indent=2) + "\n", encoding="utf-8")
    print(f"wrote {len(images)} images ({', '.join(f'{len(v)} {k}' for k, v in runs.items())}) and {RECORD_FILE} to {out}")
    return 0


def _weights_digest(model_dir: str | os.PathLike[str], sha256_file: Any) -> Optional[str]:
    f = Path(model_dir) / "model.safetensors"
    return sha256_file(f) if f.is_file() else None
