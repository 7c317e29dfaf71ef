"""``SafeVLM``: a thin generation wrapper that applies steering (CMRM or ShiftDC) to every call."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Sequence
from typing import Any

import torch
from PIL import Image
from torch import nn

from vlmsafe.adapters import ModelAdapter, get_adapter
from vlmsafe.data import BATCH_SIZE, length_order
from vlmsafe.errors import InputError
from vlmsafe.loading import load_model
from vlmsafe.steering.config import MODES, SteeringConfig
from vlmsafe.steering.directions import SafetyDirections
from vlmsafe.steering.vectors import ShiftVectors
from vlmsafe.validation import check_int


class SafeVLM:
    """Generate with a VLM under CMRM or ShiftDC steering.

    >>> vlm = SafeVLM(model, processor, vectors=ShiftVectors.load("vectors/"), alpha=1.0)
    >>> vlm.generate("how do I ...?", image)            # one item -> str
    >>> vlm.generate(prompts, images)                   # a batch  -> list[str]
    >>> SafeVLM(model, processor, steering=SteeringConfig(mode="sample", alpha=0.5))
    >>> SafeVLM(model, processor, mode="shiftdc", directions=SafetyDirections.load("directions/"))

    ``mode="dataset"`` applies calibrated ``vectors``; ``mode="sample"`` computes each input's shift
    from its own text-only counterpart (``layers`` then picks the layers, default all; ``anchor``
    measures it with a blank or noise image instead of the input's own); ``mode="shiftdc"`` removes
    each input's shift along the safety ``directions`` (default layers middle-to-last);
    ``mode=None`` (or ``alpha=0``) generates unsteered. The keyword arguments build a
    :class:`SteeringConfig`; pass ``steering=`` instead to reuse one. Batches are left-padded and
    generated greedily by default; ``generate_kwargs`` go to ``model.generate``.
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
        directions: SafetyDirections | None = None,
        anchor: Any = "real",
        shift_from: str = "unsteered",
        steering: SteeringConfig | None = None,
        system_prompt: str | None = None,
        max_new_tokens: int = 64,
        batch_size: int = BATCH_SIZE,
        generate_kwargs: dict[str, Any] | None = None,
    ):
        self.adapter: ModelAdapter = get_adapter(model, processor)
        if steering is None:
            if mode == "auto":
                mode = "dataset" if vectors is not None else "shiftdc" if directions is not None else None
            if mode is not None and mode not in MODES:
                raise InputError(f"mode must be one of {', '.join(map(repr, MODES))} or None, got {mode!r}")
            if mode == "dataset" and vectors is None:
                raise InputError(
                    "mode='dataset' needs calibrated vectors: pass vectors=ShiftVectors.load(DIR) or use mode='sample'"
                )
            steering = SteeringConfig(mode=mode, vectors=vectors if mode == "dataset" else None, alpha=alpha,
                                      layers=layers, positions=positions, decode=decode,
                                      steer_text_only=steer_text_only,
                                      directions=directions if mode == "shiftdc" else None, anchor=anchor,
                                      shift_from=shift_from)
        elif steering.mode == "dataset" and steering.vectors is None:
            raise InputError(
                "the steering config is dataset-level but has no vectors: pass SteeringConfig(vectors=...)"
            )
        steering.check_model(self.adapter)
        self.steering_config = steering
        self.system_prompt = system_prompt
        self.max_new_tokens = check_int(max_new_tokens, "max_new_tokens", low=1)
        self.batch_size = check_int(batch_size, "batch_size", low=1)
        self.generate_kwargs = {"do_sample": False, **(generate_kwargs or {})}

    @classmethod
    def from_pretrained(
        cls,
        path: str | os.PathLike[str],
        vectors: str | os.PathLike[str] | ShiftVectors | None = None,
        *,
        directions: str | os.PathLike[str] | SafetyDirections | None = None,
        dtype: torch.dtype | str | None = None,
        device: str | torch.device | None = None,
        device_map: str | dict | None = None,
        **kwargs: Any,
    ) -> SafeVLM:
        """Load model + processor with :func:`vlmsafe.loading.load_model` and wrap them."""
        model, processor = load_model(path, kind="vlm", dtype=dtype, device=device, device_map=device_map)
        if vectors is not None and not isinstance(vectors, ShiftVectors):
            vectors = ShiftVectors.load(vectors)
        if directions is not None and not isinstance(directions, SafetyDirections):
            directions = SafetyDirections.load(directions)
        return cls(model, processor, vectors, directions=directions, **kwargs)

    # ------------------------------------------------------------------ views
    @property
    def model(self) -> nn.Module:
        return self.adapter.model

    @property
    def processor(self) -> Any:
        return self.adapter.processor

    @property
    def mode(self) -> str | None:
        return self.steering_config.mode

    @property
    def alpha(self) -> float:
        return self.steering_config.alpha

    @property
    def vectors(self) -> ShiftVectors | None:
        return self.steering_config.vectors

    def with_alpha(self, alpha: float) -> SafeVLM:
        """A copy sharing the model and vectors, with another ``alpha`` (for sweeps)."""
        return self.with_steering(self.steering_config.with_alpha(alpha))

    def with_steering(self, steering: SteeringConfig) -> SafeVLM:
        """A copy sharing the model, steered by another config."""
        steering.check_model(self.adapter)
        clone = object.__new__(SafeVLM)
        clone.__dict__.update(self.__dict__)
        clone.steering_config = steering
        return clone

    # ------------------------------------------------------------------ generation
    def generate(
        self,
        prompts: str | Sequence[str],
        images: Image.Image | Sequence[Image.Image | None] | None = None,
        *,
        max_new_tokens: int | None = None,
        captions: str | Sequence[str | None] | None = None,
        **generate_kwargs: Any,
    ) -> str | list[str]:
        """Generate one response per prompt (a str for a single prompt, else a list, in input order).

        Prompts are batched ``batch_size`` at a time with their like (:func:`vlmsafe.data.length_order`:
        with an image first, then longest first), left-padded, images batched by the processor;
        steering is prepared once per batch (sample-level: one text-only pass for the whole batch).
        Greedy answers do not depend on the batching.

        ``captions`` (ShiftDC only): known captions of the images, one per prompt (``None`` where
        unknown); the model writes the missing ones.
        """
        single = isinstance(prompts, str)
        if single:
            prompts, images = [prompts], [images]
            captions = None if captions is None else [captions]
        prompts = list(prompts)
        if isinstance(images, Image.Image):
            raise InputError(
                "got a list of prompts but a single image; pass a list with one image (or None) per prompt"
            )
        images = [None] * len(prompts) if images is None else list(images)
        if len(images) != len(prompts):
            raise InputError(
                f"got {len(prompts)} prompts but {len(images)} images; pass one image (or None) per prompt"
            )
        captions = [None] * len(prompts) if captions is None else list(captions)
        if len(captions) != len(prompts):
            raise InputError(f"got {len(prompts)} prompts but {len(captions)} captions; "
                             "pass one caption (or None) per prompt")
        budget = self.max_new_tokens if max_new_tokens is None else check_int(max_new_tokens, "max_new_tokens", low=1)
        order = length_order(prompts, [img is not None for img in images])  # like with like: little padding
        out: dict[int, str] = {}
        for start in range(0, len(order), self.batch_size):
            rows = order[start : start + self.batch_size]
            answers = self._generate_batch([prompts[i] for i in rows], [images[i] for i in rows], budget,
                                           generate_kwargs, [captions[i] for i in rows])
            out.update(zip(rows, answers))
        return out[0] if single else [out[i] for i in range(len(prompts))]

    @torch.no_grad()
    def _generate_batch(self, prompts, images, max_new_tokens, generate_kwargs, captions=None) -> list[str]:
        adapter = self.adapter
        inputs = adapter.build_inputs(prompts, images, system_prompt=self.system_prompt, padding_side="left")
        kwargs = {**self.generate_kwargs, **generate_kwargs, "max_new_tokens": max_new_tokens}
        tokenizer = getattr(self.processor, "tokenizer", self.processor)
        kwargs.setdefault("pad_token_id", tokenizer.pad_token_id)
        with self.steering(prompts, images, captions):
            output = adapter.model.generate(**inputs, **kwargs)
        return adapter.decode(output[:, inputs["input_ids"].shape[1] :])

    def steering(self, prompts: Sequence[str], images: Sequence[Image.Image | None],
                 captions: Sequence[str | None] | None = None) -> contextlib.AbstractContextManager:
        """The steering context for one batch (a no-op when unsteered)."""
        return self.steering_config.apply(self.adapter, prompts=prompts, images=images,
                                          system_prompt=self.system_prompt, captions=captions)


__all__ = ["SafeVLM"]
