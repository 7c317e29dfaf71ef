"""The trainable weights of a Safe-CLIP run: LoRA injected into the trained towers (or the towers unfrozen),
read and written as CPU copies, and merged into a standalone model at the end.

:class:`TrainableWeights` is what the checkpointer saves and restores and what "best weights" snapshots
are taken of; :func:`make_trainable` builds it from the backend's model.
"""

from __future__ import annotations

import copy
from typing import Any

import torch
from torch import nn

from vlmsafe.errors import FileFormatError, InputError
from vlmsafe.safeclip.backends import CLIPBackend
from vlmsafe.safeclip.config import SafeCLIPTrainingConfig


class TrainableWeights:
    """The parameters ``names`` of ``inner`` (the model the towers run; ``peft_model`` wraps it under LoRA)."""

    def __init__(self, inner: nn.Module, names: list[str], peft_model: Any = None):
        self.inner = inner
        self.names = names
        self.peft_model = peft_model

    def state_dict(self) -> dict[str, torch.Tensor]:
        """CPU copies of the trainable parameters (LoRA weights, or the fine-tuned towers)."""
        params = dict(self.inner.named_parameters())
        return {n: params[n].detach().to("cpu", copy=True).contiguous() for n in self.names}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        """Copy ``state`` (exactly the trainable names) into the parameters."""
        params = dict(self.inner.named_parameters())
        missing = set(self.names) - set(state)
        extra = set(state) - set(self.names)
        if missing or extra:
            raise FileFormatError(
                f"checkpoint weights do not match this trainer (missing {sorted(missing)[:3]}, unexpected "
                f"{sorted(extra)[:3]}); resume with the same model, towers and LoRA settings"
            )
        with torch.no_grad():
            for n, t in state.items():
                params[n].copy_(t.to(params[n].device, params[n].dtype))

    def merged(self, snapshot: dict[str, torch.Tensor] | None = None) -> nn.Module:
        """A standalone copy of the model with LoRA merged in, at ``snapshot`` (default: the current weights);
        the live weights are left as they were."""
        current = self.state_dict()
        if snapshot is not None:
            self.load_state_dict(snapshot)
        try:
            merged = copy.deepcopy(self.peft_model).merge_and_unload() if self.peft_model is not None \
                else copy.deepcopy(self.inner)
        finally:
            self.load_state_dict(current)
        merged.requires_grad_(False).eval()
        return merged


def make_trainable(
    backend: CLIPBackend, model: nn.Module, towers: tuple[str, ...], config: SafeCLIPTrainingConfig
) -> TrainableWeights:
    """Inject LoRA into the trained ``towers`` of ``model`` (or unfreeze them); everything else is frozen."""
    model.requires_grad_(False)
    peft_model, inner = None, model
    if not config.use_lora:
        for _, p in backend.tower_parameters(model, towers):
            p.requires_grad_(True)
    else:
        from peft import LoraConfig

        from vlmsafe.loading import inject_lora

        lora = LoraConfig(
            r=config.lora_r,
            lora_alpha=config.lora_alpha,
            lora_dropout=config.lora_dropout,
            target_modules=backend.lora_target_regex(towers, config.lora_target_modules),
        )
        try:
            peft_model = inject_lora(model, lora)
        except ValueError as exc:
            targets = config.lora_target_modules or backend.default_lora_modules
            raise InputError(
                f"LoRA could not target {targets} in this model: {exc}. Set lora_target_modules to leaf module "
                "names that exist"
            ) from exc
        inner = peft_model.base_model.model
    names = [n for n, p in inner.named_parameters() if p.requires_grad]
    if not names:
        raise InputError("no trainable parameters: check lora_target_modules and the trained towers")
    return TrainableWeights(inner, names, peft_model)
