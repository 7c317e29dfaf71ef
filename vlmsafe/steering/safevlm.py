"""``SafeVLM``: a thin generation wrapper that applies CMRM steering to every call."""

from __future__ import annotations

import contextlib
import os
from typing import Any, Sequence

import torch
from PIL import Image
from torch import nn

from vlmsafe.activations import record_activations
from vlmsafe.adapters import ModelAdapter, get_adapter
from vlmsafe.errors import FileFormatError, InputError
from vlmsafe.steering.cmrm import STEER_POSITIONS, steer, steer_sample_level
from vlmsafe.steering.vectors import ShiftVectors

MODES = ("dataset", "sample", None)


class SafeVLM:
    """Generate with a VLM under CMRM steering.

    >>> vlm = SafeVLM(model, processor, vectors=ShiftVectors.load("vectors/"), alpha=1.0)
    >>> vlm.generate("how do I ...?", image)            # one item -> str
    >>> vlm.generate(prompts, images)                   # a batch  -> list[str]

    ``mode="dataset"`` applies calibrated ``vectors``; ``mode="sample"`` computes each input's shift
    from its own text-only counterpart (``layers`` then picks the layers, default all);
    ``mode=None`` (or ``alpha=0``) generates unsteered. Batches are left-padded and generated
    greedily by default; ``generate_kwargs`` go to ``model.generate``.
    """

    def __init__(
        self,
        model: nn.Module,
        processor: Any,
        vectors: ShiftVectors | None = None,
        alpha: float = 1.0,
        *,
        mode: str | None = "auto",
        layers: int | Sequence[int] | str | None = None,
        positions: str = "last",
        decode: bool = False,
        steer_text_only: bool = False,
        system_prompt: str | None = None,
        max_new_tokens: int = 64,
        batch_size: int = 8,
        generate_kwargs: dict[str, Any] | None = None,
    ):
        self.adapter: ModelAdapter = get_adapter(model, processor)
        if mode == "auto":
            mode = "dataset" if vectors is not None else None
        if mode not in MODES:
            raise InputError(f"mode must be 'dataset', 'sample' or None, got {mode!r}")
        if mode == "dataset" and vectors is None:
            raise InputError("mode='dataset' needs calibrated vectors: pass vectors=ShiftVectors.load(DIR) or use mode='sample'")
        if positions not in STEER_POSITIONS:
            raise InputError(f"positions must be one of {STEER_POSITIONS}, got {positions!r}")
        if vectors is not None:
            vectors.check_compatible(self.adapter)
        self.vectors = vectors
        self.alpha = float(alpha)
        self.mode = mode
        self.layers = layers
        self.positions = positions
        self.decode = decode
        self.steer_text_only = steer_text_only
        self.system_prompt = system_prompt
        self.max_new_tokens = max_new_tokens
        self.batch_size = batch_size
        self.generate_kwargs = {"do_sample": False, **(generate_kwargs or {})}

    @classmethod
    def from_pretrained(
        cls,
        path: str | os.PathLike[str],
        vectors: str | os.PathLike[str] | ShiftVectors | None = None,
        *,
        torch_dtype: torch.dtype | str | None = None,
        device: str | torch.device | None = None,
        **kwargs: Any,
    ) -> "SafeVLM":
        """Load model + processor from a local HF directory (or hub id, if online) and wrap them."""
        model, processor = load_model(path, torch_dtype=torch_dtype, device=device)
        if vectors is not None and not isinstance(vectors, ShiftVectors):
            vectors = ShiftVectors.load(vectors)
        return cls(model, processor, vectors, **kwargs)

    @property
    def model(self) -> nn.Module:
        return self.adapter.model

    @property
    def processor(self) -> Any:
        return self.adapter.processor

    def with_alpha(self, alpha: float) -> "SafeVLM":
        """A copy sharing the model and vectors, with another ``alpha`` (for sweeps)."""
        clone = object.__new__(SafeVLM)
        clone.__dict__.update(self.__dict__)
        clone.alpha = float(alpha)
        return clone

    # ------------------------------------------------------------------ generation
    def generate(
        self,
        prompts: str | Sequence[str],
        images: Image.Image | None | Sequence[Image.Image | None] = None,
        *,
        max_new_tokens: int | None = None,
        **generate_kwargs: Any,
    ) -> str | list[str]:
        single = isinstance(prompts, str)
        if single:
            prompts, images = [prompts], [images]
        prompts = list(prompts)
        if isinstance(images, Image.Image):
            raise InputError("got a list of prompts but a single image; pass a list with one image (or None) per prompt")
        images = [None] * len(prompts) if images is None else list(images)
        if len(images) != len(prompts):
            raise InputError(f"got {len(prompts)} prompts but {len(images)} images; pass one image (or None) per prompt")
        out: list[str] = []
        for start in range(0, len(prompts), self.batch_size):
            out.extend(self._generate_batch(prompts[start : start + self.batch_size], images[start : start + self.batch_size],
                                            max_new_tokens or self.max_new_tokens, generate_kwargs))
        return out[0] if single else out

    @torch.no_grad()
    def _generate_batch(self, prompts, images, max_new_tokens, generate_kwargs) -> list[str]:
        adapter = self.adapter
        inputs = adapter.build_inputs(prompts, images, system_prompt=self.system_prompt, padding_side="left")
        kwargs = {**self.generate_kwargs, **generate_kwargs, "max_new_tokens": max_new_tokens}
        tokenizer = getattr(self.processor, "tokenizer", self.processor)
        kwargs.setdefault("pad_token_id", tokenizer.pad_token_id)
        with self.steering(prompts, images):
            output = adapter.model.generate(**inputs, **kwargs)
        return adapter.decode(output[:, inputs["input_ids"].shape[1] :])

    def steering(self, prompts: Sequence[str], images: Sequence[Image.Image | None]) -> contextlib.AbstractContextManager:
        """The steering context for one batch (a no-op when unsteered)."""
        if self.mode is None or self.alpha == 0.0 or all(img is None for img in images) and not self.steer_text_only:
            return contextlib.nullcontext()
        if self.mode == "dataset":
            return steer(self.adapter, self.vectors, self.alpha, layers=self.layers, positions=self.positions,
                         decode=self.decode, steer_text_only=self.steer_text_only)
        layer_ids = self.adapter.resolve_layers(self.layers)
        text_inputs = self.adapter.build_inputs(list(prompts), None, system_prompt=self.system_prompt, padding_side="left")
        with record_activations(self.adapter, layer_ids, positions="last", dtype=torch.float32, device=None) as rec:
            self.adapter.model(**text_inputs)
        return steer_sample_level(self.adapter, dict(rec.activations), self.alpha, positions=self.positions, decode=self.decode)


def load_model(path: str | os.PathLike[str], *, torch_dtype: Any = None, device: Any = None) -> tuple[nn.Module, Any]:
    """Load a HF model + processor from ``path``, picking the class from its config.

    Vision-language models load with ``AutoModelForImageTextToText``, text-only ones with
    ``AutoModelForCausalLM``. A missing or malformed directory gives one clear error.
    """
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForImageTextToText, AutoProcessor, AutoTokenizer

    path = os.fspath(path)
    if os.path.exists(path) and not os.path.isfile(os.path.join(path, "config.json")):
        raise FileFormatError(f"{path} has no config.json: pass a directory written by save_pretrained (model + processor)")
    try:
        config = AutoConfig.from_pretrained(path)
    except (OSError, ValueError) as exc:
        raise FileFormatError(f"cannot load a model config from {path!r}: {exc}".split("\n")[0]) from None
    kwargs = {"dtype": torch_dtype} if torch_dtype is not None else {}
    is_vlm = hasattr(config, "vision_config")
    if is_vlm:
        model = AutoModelForImageTextToText.from_pretrained(path, **kwargs)
        processor = AutoProcessor.from_pretrained(path)
    else:
        model = AutoModelForCausalLM.from_pretrained(path, **kwargs)
        processor = AutoTokenizer.from_pretrained(path)
    if device is not None:
        model = model.to(device)
    return model.eval(), processor
