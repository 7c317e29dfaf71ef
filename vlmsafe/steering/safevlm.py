"""``SafeVLM``: a thin generation wrapper that applies steering (CMRM or ShiftDC) to every call."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from PIL import Image
from torch import nn

from vlmsafe.adapters import ModelAdapter, get_adapter
from vlmsafe.data import BATCH_SIZE, as_pair, length_order
from vlmsafe.errors import InputError
from vlmsafe.loading import load_model
from vlmsafe.steering.config import SteeringConfig, as_steering
from vlmsafe.validation import check_int


class SafeVLM:
    """Generate with a VLM under a steering method (CMRM dataset- or sample-level, ShiftDC, or one registered).

    >>> vlm = SafeVLM(model, processor, ShiftVectors.load("vectors/"))   # the setting the vectors record
    >>> vlm.generate("how do I ...?", image)            # one item -> str
    >>> vlm.generate(prompts, images)                   # a batch  -> list[str]
    >>> SafeVLM(model, processor, SteeringConfig(mode="sample", alpha=0.5, layers=[3]))
    >>> SafeVLM(model, processor, SafetyDirections.load("directions/"))

    ``steering`` is a steering object: a :class:`SteeringConfig` (any registered method,
    :mod:`vlmsafe.steering.registry`), or a method's artefact (:class:`~vlmsafe.steering.ShiftVectors`,
    :class:`~vlmsafe.steering.SafetyDirections`) steered with the setting it records (the one ``vlmsafe
    calibrate`` recommends, else alpha 1 at every calibrated layer), or ``None``: unsteered. Nothing is copied
    from it: ``steering_config`` is the config applied. Batches are left-padded and generated greedily by
    default; ``generate_kwargs`` go to ``model.generate``.
    """

    def __init__(
        self,
        model: nn.Module,
        processor: Any,
        steering: Any = None,
        *,
        system_prompt: str | None = None,
        max_new_tokens: int = 64,
        batch_size: int = BATCH_SIZE,
        generate_kwargs: dict[str, Any] | None = None,
    ):
        self.adapter: ModelAdapter = get_adapter(model, processor)
        self.steering_config: SteeringConfig = as_steering(steering)
        self.steering_config.check_ready()
        self.steering_config.check_model(self.adapter)
        self.system_prompt = system_prompt
        self.max_new_tokens = check_int(max_new_tokens, "max_new_tokens", low=1)
        self.batch_size = check_int(batch_size, "batch_size", low=1)
        if generate_kwargs is not None and not isinstance(generate_kwargs, Mapping):
            raise InputError(f"`generate_kwargs` must be a dict of model.generate arguments, e.g. "
                             f"{{'do_sample': True}}, got {type(generate_kwargs).__name__}")
        self.generate_kwargs = {"do_sample": False, **(generate_kwargs or {})}

    @classmethod
    def from_pretrained(
        cls,
        path: str | os.PathLike[str],
        steering: Any = None,
        *,
        dtype: torch.dtype | str | None = None,
        device: str | torch.device | None = None,
        device_map: str | dict | None = None,
        **kwargs: Any,
    ) -> SafeVLM:
        """Load model + processor with :func:`vlmsafe.loading.load_model` and wrap them.

        ``steering``: a steering object, or the folder (or Hub id) of one: vectors (``vectors.json``) or ShiftDC
        directions (``directions.json``), loaded and steered with the setting they record."""
        model, processor = load_model(path, kind="vlm", dtype=dtype, device=device, device_map=device_map)
        if isinstance(steering, (str, os.PathLike)):
            steering = _load_artefact(steering)
        return cls(model, processor, steering, **kwargs)

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
    def vectors(self) -> Any:
        return self.steering_config.vectors

    def with_alpha(self, alpha: float) -> SafeVLM:
        """A copy sharing the model and vectors, with another ``alpha`` (for sweeps)."""
        return self.with_steering(self.steering_config.with_alpha(alpha))

    def with_steering(self, steering: Any) -> SafeVLM:
        """A copy sharing the model, steered by another steering object (as the constructor takes)."""
        steering = as_steering(steering)
        steering.check_ready()
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
        prompts, images = _pairs(prompts, images)
        if single:
            captions = None if captions is None else [captions]
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


def _pairs(prompts: Any, images: Any) -> tuple[list[str], list[Image.Image | None]]:
    """The prompts and their images as two equal lists: a path is opened, anything else that is not a PIL image
    or ``None`` is refused here (:func:`vlmsafe.data.as_pair`), not deep in the processor as an AttributeError."""
    if isinstance(prompts, str):
        if isinstance(images, (list, tuple)):
            raise InputError(f"got one prompt (a str) but a list of {len(images)} images; pass the image itself "
                             "with one prompt, or a list of prompts with the list of images")
        prompts, images = [prompts], [images]
    elif not isinstance(prompts, (list, tuple)) and not hasattr(prompts, "__iter__"):
        raise InputError(f"prompts must be a str or a list of str, got {type(prompts).__name__}")
    prompts = list(prompts)
    if isinstance(images, (str, os.PathLike, Image.Image)):
        raise InputError(
            "got a list of prompts but a single image; pass a list with one image (or None) per prompt"
        )
    images = [None] * len(prompts) if images is None else list(images)
    if len(images) != len(prompts):
        raise InputError(
            f"got {len(prompts)} prompts but {len(images)} images; pass one image (or None) per prompt"
        )
    pairs = [as_pair((prompt, image)) for prompt, image in zip(prompts, images)]
    return [p for p, _ in pairs], [im for _, im in pairs]


def _load_artefact(path: str | os.PathLike[str]) -> Any:
    """The artefact a folder holds: ShiftDC directions (``directions.json``), else CMRM vectors (a folder or Hub id;
    load Hub directions with ``SafetyDirections.load`` and pass them)."""
    from pathlib import Path

    from vlmsafe.steering.shiftdc.directions import META_FILE as DIRECTIONS_META
    from vlmsafe.steering.shiftdc.directions import SafetyDirections
    from vlmsafe.steering.vectors import ShiftVectors

    if Path(path).joinpath(DIRECTIONS_META).is_file():
        return SafetyDirections.load(path)
    return ShiftVectors.load(path)


__all__ = ["SafeVLM"]
