"""Text-to-image with a Safe-CLIP text encoder swapped into your own diffusers pipeline.

The Safe-CLIP paper's text-to-image use (Poppi et al., ECCV 2024, Sec. 5.3): replace a Stable
Diffusion pipeline's CLIP text encoder with the Safe-CLIP one and keep everything else.
:func:`run_generate` (the ``vlmsafe safeclip generate`` command) does that for pipelines saved in the
diffusers layout -- SD 1.x/2.x (``text_encoder``) and SDXL (``text_encoder`` + ``text_encoder_2``) --
through :func:`~vlmsafe.safeclip.integrations.apply_safe_text_encoder`, and writes the images plus
``generations.json`` (which prompt, seed and text encoder made each file).

With ``also_original`` every prompt is also generated with the pipeline's own encoder(s) from the
same starting noise (prompt ``i``, image ``j`` uses seed ``seed + i * images_per_prompt + j``), so
the two folders compare image for image.

Everything that can be checked is checked before the pipeline is loaded: the numbers, the prompt
file, the output folder, the pipeline layout and that each Safe-CLIP text tower has the
architecture of the encoder it replaces.
"""

from __future__ import annotations

import contextlib
import json
import os
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from vlmsafe.errors import FileFormatError, InputError
from vlmsafe.options import check_options, float_option, int_option, switch_option
from vlmsafe.validation import SEED_MAX

SAFE, ORIGINAL, RECORD_FILE = "safe", "original", "generations.json"

#: The largest classifier-free guidance scale accepted. Useful scales are about 1-20 (diffusers' default 7.5);
#: a huge one (1e300) overflows the noise prediction and the pipeline decodes all-black images without an error.
GUIDANCE_MAX = 100.0


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
                raise FileFormatError(
                    f"{where}: no 'prompt' text in this record; give every record a non-empty \"prompt\" string"
                )
            out.append({"id": str(rec.get("id", i)), "prompt": text})
        return out
    if not p.is_file():
        raise FileFormatError(
            f"{p}: prompt file does not exist; pass a .txt file (one prompt per line) or JSONL with 'prompt'"
        )
    try:
        lines = [line.strip() for line in p.read_text(encoding="utf-8").splitlines()]
    except UnicodeDecodeError as exc:
        raise FileFormatError(f"{p}: not UTF-8 text ({exc.reason}); save the prompts as UTF-8") from None
    out = [{"id": str(i), "prompt": line} for i, line in enumerate(x for x in lines if x)]
    if not out:
        raise FileFormatError(f"{p}: no prompts in the file; write one prompt per line")
    return out


def pipeline_index(pipeline: str | os.PathLike[str]) -> dict[str, Any]:
    """The pipeline's ``model_index.json``; refuses pipelines without a text encoder."""
    from vlmsafe.reading import read_json

    p = Path(pipeline)
    index = read_json(
        p / "model_index.json",
        what="diffusers pipeline index",
        fix="pass a folder written by DiffusionPipeline.save_pretrained (it holds model_index.json)",
    )
    if not isinstance(index.get("text_encoder"), list) or index["text_encoder"][0] is None:
        raise InputError(
            f"`pipeline` {p}: the pipeline has no text_encoder ({index.get('_class_name')}); "
            "pass a Stable Diffusion / SDXL text-to-image pipeline"
        )
    return index


def check_encoder_fits(safe_dir: str | os.PathLike[str], encoder_dir: str | os.PathLike[str], option: str) -> None:
    """Compare a Safe-CLIP checkpoint's text config with a pipeline encoder's config.json (no weights loaded)."""
    from vlmsafe.reading import read_json
    from vlmsafe.safeclip.integrations import _TEXT_FIELDS

    safe = read_json(
        Path(safe_dir) / "config.json",
        what="Safe-CLIP model config",
        fix=f"pass to {option} the folder written by `vlmsafe safeclip train` (OUTPUT_DIR/model)",
    )
    text = safe.get("text_config")
    if not isinstance(text, dict):
        raise FileFormatError(
            f"{option} {safe_dir}: config.json is not a CLIPModel config (no text_config); "
            "pass the Safe-CLIP model folder"
        )
    mine = read_json(Path(encoder_dir) / "config.json", what="pipeline text encoder config")
    diff = [
        f"{k}: {text.get(k)} vs the pipeline's {mine.get(k)}"
        for k in _TEXT_FIELDS
        if k in mine and text.get(k) != mine.get(k)
    ]
    if diff:
        raise InputError(
            f"{option} {safe_dir}: its text tower does not fit {Path(encoder_dir).name} ({'; '.join(diff)}); "
            "fine-tune Safe-CLIP from the CLIP this pipeline uses"
        )


def _check_size(value: int | None, option: str) -> None:
    if value is not None and value % 8:
        raise InputError(
            f"{option} {value} is not a multiple of 8; diffusers pipelines need e.g. {value - value % 8 or 8}"
        )


# ---------------------------------------------------------------------------------- run


@dataclass
class GenerateSettings:
    """How ``run_generate`` samples and where it runs: the same for the Safe-CLIP and the original encoder,
    and recorded in ``generations.json``. Each number is checked once, here, when the settings are made."""

    steps: int = int_option(30, "denoising steps")
    guidance: float = float_option(
        7.5, f"classifier-free guidance scale, in [0, {GUIDANCE_MAX:g}] (<= 1 disables guidance)", low=0,
        high=GUIDANCE_MAX)
    seed: int = int_option(0, "seed of the first image; image k uses seed + k", low=0, high=SEED_MAX)
    images_per_prompt: int = int_option(1, "images per prompt")
    batch_size: int = int_option(4, "prompts per pipeline call")
    height: int | None = int_option(None, "image height in pixels, a multiple of 8 (None: the pipeline's)", low=8)
    width: int | None = int_option(None, "image width in pixels, a multiple of 8 (None: the pipeline's)", low=8)
    negative_prompt: str | None = None
    also_original: bool = switch_option(
        False, "also generate every prompt with the pipeline's own text encoder(s), from the same noise",
        flag="--also-original", const=True, flag_help="also generate with the pipeline's own text encoder(s)")
    dtype: str | None = None  # a name of vlmsafe.dtypes; None: float32
    device: str | None = None  # None: the CPU; "auto": CUDA when available
    progress: bool = switch_option(True, "show progress bars", flag="--no-progress", const=False,
                                   flag_help="hide progress bars")

    def __post_init__(self) -> None:
        check_options(self)
        _check_size(self.height, "`height`")
        _check_size(self.width, "`width`")

    def sampling(self) -> dict[str, Any]:
        """The sampling settings as ``generations.json`` records them."""
        return {name: getattr(self, name) for name in ("steps", "guidance", "seed", "images_per_prompt",
                                                        "batch_size", "height", "width", "negative_prompt")}


def generate_images(pipe: Any, prompts: Sequence[dict[str, str]], settings: GenerateSettings) -> list[Any]:
    """PIL images, ``images_per_prompt`` per prompt in prompt order; image ``k`` starts from seed ``seed + k``.

    One generator per image makes an image independent of the batch it was made in.
    """
    import torch
    from tqdm.auto import tqdm

    st = settings
    out = []
    for start in tqdm(range(0, len(prompts), st.batch_size), desc="generate", disable=not st.progress):
        chunk = [p["prompt"] for p in prompts[start : start + st.batch_size]]
        first = st.seed + start * st.images_per_prompt
        gens = [torch.Generator().manual_seed(first + k) for k in range(len(chunk) * st.images_per_prompt)]
        kwargs: dict[str, Any] = {
            "num_inference_steps": st.steps,
            "guidance_scale": st.guidance,
            "generator": gens,
            "num_images_per_prompt": st.images_per_prompt,
        }
        if st.height is not None:
            kwargs["height"] = st.height
        if st.width is not None:
            kwargs["width"] = st.width
        if st.negative_prompt is not None:
            kwargs["negative_prompt"] = [st.negative_prompt] * len(chunk)
        out.extend(pipe(chunk, **kwargs).images)
    return out


def run_generate(
    pipeline: str | os.PathLike[str],
    text_encoder: str | os.PathLike[str],
    prompts_file: str | os.PathLike[str],
    out: str | os.PathLike[str],
    settings: GenerateSettings | None = None,
    *,
    text_encoder_2: str | os.PathLike[str] | None = None,
    keep_text_encoder_2: bool = False,
    overwrite: bool = False,
) -> dict[str, Any]:
    """Generate every prompt with the Safe-CLIP encoder(s) (and, with ``settings.also_original``, without);
    write ``out``.

    Writes ``out/safe/<k>.png`` (and ``out/original/<k>.png``) and ``out/generations.json``, atomically;
    returns the record written to ``generations.json``. ``settings`` (default :class:`GenerateSettings`)
    holds how images are sampled and where the pipeline runs.

    Raises:
        InputError / FileFormatError / OutputExistsError: before the pipeline is loaded.
    """

    from vlmsafe.dtypes import dtype_name, torch_dtype
    from vlmsafe.io import atomic_path, check_output
    from vlmsafe.loading import resolve_device
    from vlmsafe.reading import sha256_file
    from vlmsafe.safeclip.integrations import apply_safe_text_encoder

    # --- everything checkable before loading anything heavy (the settings checked themselves when made)
    settings = GenerateSettings() if settings is None else settings
    progress = settings.progress
    dtype = dtype_name(settings.dtype or "float32", "dtype")
    device = str(resolve_device(settings.device) or "cpu")
    inputs = (("`pipeline`", pipeline), ("`text_encoder`", text_encoder), ("`text_encoder_2`", text_encoder_2),
              ("`prompts_file`", prompts_file))
    dest = check_output(out, kind="dir", overwrite=overwrite, inputs=inputs)
    prompts = read_prompts(prompts_file)
    index = pipeline_index(pipeline)
    pipe_dir = Path(pipeline)
    check_encoder_fits(text_encoder, pipe_dir / "text_encoder", "`text_encoder`")
    has_second = isinstance(index.get("text_encoder_2"), list) and index["text_encoder_2"][0] is not None
    if has_second and not (text_encoder_2 or keep_text_encoder_2):
        raise InputError(
            f"`pipeline` {pipe_dir} has a second text encoder (SDXL); pass `text_encoder_2` SAFE_DIR (Safe-CLIP "
            "fine-tuned from that CLIP) or `keep_text_encoder_2` to replace only the first one (the second still "
            "carries unsafe concepts)"
        )
    if keep_text_encoder_2 and (text_encoder_2 or not has_second):
        why = "`text_encoder_2` replaces it" if text_encoder_2 else f"{pipe_dir} has no text_encoder_2 (not SDXL)"
        raise InputError(f"`keep_text_encoder_2` has nothing to keep: {why}; drop it")
    if text_encoder_2:
        if not has_second:
            raise InputError(
                f"`text_encoder_2` was given but {pipe_dir} has no text_encoder_2 "
                "(only SDXL-style pipelines do); drop it"
            )
        check_encoder_fits(text_encoder_2, pipe_dir / "text_encoder_2", "`text_encoder_2`")

    pipe = load_pipeline(pipe_dir, dtype=torch_dtype(dtype), device=device, progress=progress, what="`pipeline`")
    runs: dict[str, list[Any]] = {}
    encoders: dict[str, dict[str, Any]] = {}
    t0 = time.time()
    if settings.also_original:
        runs[ORIGINAL] = generate_images(pipe, prompts, settings)
        encoders[ORIGINAL] = {"text_encoder": str(pipe_dir / "text_encoder")}
        if has_second:
            encoders[ORIGINAL]["text_encoder_2"] = str(pipe_dir / "text_encoder_2")
    with _loading_bars(progress):
        apply_safe_text_encoder(pipe, text_encoder, path_2=text_encoder_2)
    runs[SAFE] = generate_images(pipe, prompts, settings)
    encoders[SAFE] = {
        "text_encoder": str(text_encoder),
        "text_encoder_sha256": _weights_digest(text_encoder, sha256_file),
    }
    if has_second:
        encoders[SAFE]["text_encoder_2"] = str(text_encoder_2 or pipe_dir / "text_encoder_2")
        if text_encoder_2:
            encoders[SAFE]["text_encoder_2_sha256"] = _weights_digest(text_encoder_2, sha256_file)

    images = []
    with atomic_path(dest, overwrite=overwrite) as tmp:
        tmp.mkdir()
        for name, imgs in runs.items():
            (tmp / name).mkdir()
            for k, img in enumerate(imgs):
                i, j = divmod(k, settings.images_per_prompt)
                rel = f"{name}/{k:05d}.png"
                img.save(tmp / rel)
                images.append(
                    {
                        "file": rel,
                        "encoder": name,
                        "prompt_id": prompts[i]["id"],
                        "prompt": prompts[i]["prompt"],
                        "image_index": j,
                        "seed": settings.seed + k,
                    }
                )
        record = {
            "pipeline": str(pipe_dir),
            "pipeline_class": type(pipe).__name__,
            "prompts_file": str(prompts_file),
            "encoders": encoders,
            "settings": {**settings.sampling(), "dtype": dtype, "device": device},
            "seconds": round(time.time() - t0, 2),
            "images": images,
        }
        (tmp / RECORD_FILE).write_text(json.dumps(record, indent=2) + "\n", encoding="utf-8")
    return record


def load_pipeline(
    path: str | os.PathLike[str],
    *,
    dtype: Any = None,
    device: Any = None,
    progress: bool | None = None,
    what: str = "pipeline",
    **overrides: Any,
) -> Any:
    """A diffusers pipeline folder, loaded the one way vlmsafe loads them (sampling progress bar off).

    ``dtype`` None is float32 (diffusers' default, not named, which would only trigger its
    torch_dtype -> dtype rename warning); ``progress`` switches the loading bars on or off for the load
    (None leaves them as they are); ``overrides`` go to ``from_pretrained`` (e.g.
    ``safety_checker=None``); ``what`` names the folder in the one-line error (a parameter or a flag).
    """
    import torch
    from diffusers import DiffusionPipeline

    load_kwargs = {} if dtype is None or dtype is torch.float32 else {"torch_dtype": dtype}
    try:
        with contextlib.nullcontext() if progress is None else _loading_bars(progress):
            pipe = DiffusionPipeline.from_pretrained(str(path), **load_kwargs, **overrides)
    except (OSError, ValueError) as exc:
        raise FileFormatError(
            f"{what} {path}: cannot load the diffusers pipeline ({str(exc).splitlines()[0]}); "
            "pass a complete pipeline folder"
        ) from exc
    if device is not None:
        pipe = pipe.to(device)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@contextlib.contextmanager
def _loading_bars(progress: bool) -> Iterator[None]:
    """diffusers' and transformers' loading bars on or off for the duration, as ``progress`` says (restored after:
    they are process-wide switches)."""
    from diffusers.utils import logging as diffusers_logging
    from transformers.utils import logging as transformers_logging

    libs = (diffusers_logging, transformers_logging)
    before = [lib.is_progress_bar_enabled() for lib in libs]
    _set_bars(libs, [progress] * len(libs))
    try:
        yield
    finally:
        _set_bars(libs, before)


def _set_bars(libs: Sequence[Any], enabled: Sequence[bool]) -> None:
    for lib, on in zip(libs, enabled):
        if on:
            lib.enable_progress_bar()
        else:
            lib.disable_progress_bar()


def _weights_digest(model_dir: str | os.PathLike[str], sha256_file: Any) -> str | None:
    f = Path(model_dir) / "model.safetensors"
    return sha256_file(f) if f.is_file() else None
