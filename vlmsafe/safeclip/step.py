"""The Safe-CLIP loss of one training batch, and its gradient.

:class:`LossStep` runs the trainable towers (:class:`~vlmsafe.safeclip.batches.TrainableTowers`) and the frozen
reference (:class:`~vlmsafe.safeclip.reference.FrozenReference`) on a batch and returns the terms of
:func:`~vlmsafe.safeclip.losses.safeclip_losses`; :meth:`LossStep.forward_backward` is what the training loop
calls per micro-batch.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from vlmsafe.errors import InputError
from vlmsafe.safeclip.batches import row_mask
from vlmsafe.safeclip.config import SafeCLIPTrainingConfig
from vlmsafe.safeclip.distributed import gather_embeddings
from vlmsafe.safeclip.losses import (
    ALL_LOSS_NAMES,
    TERMS_BY_EMBEDDING,
    TOKEN_TERM,
    SafeCLIPEmbeddings,
    safeclip_losses,
    token_drift,
)
from vlmsafe.safeclip.reference import FrozenReference, RefOutputs


class LossStep:
    """The loss of a batch: ``module`` (the prepared trainable towers) against ``frozen`` (the reference)."""

    def __init__(self, module: nn.Module, frozen: FrozenReference, accelerator: Any, config: SafeCLIPTrainingConfig):
        self.module = module
        self.frozen = frozen
        self.accelerator = accelerator
        self.config = config

    @property
    def world_size(self) -> int:
        return self.accelerator.num_processes

    def compute_losses(self, batch: dict[str, Any]) -> dict[str, torch.Tensor]:
        """Forward one batch (this process's share) and return the terms and ``loss``.

        With several processes the embeddings of all processes are gathered first, so the
        returned losses are those of the global batch on every process.
        """
        emb = self._embeddings(batch, self.module(batch))
        if self.world_size > 1:
            emb = gather_embeddings(emb, self.accelerator, int(batch["size"]))
        return self._losses(emb)

    def forward_backward(self, batch: dict[str, Any], scale: float = 1.0) -> dict[str, torch.Tensor]:
        """The losses of one batch (detached), with the gradient of ``scale * loss`` added to ``.grad``.

        Every term involves exactly one trainable embedding, T(S), T(U), I(V) or I(G) (its partner comes
        from the frozen reference), so the loss is a sum of one part per embedding. In one process each
        tower pass is therefore backpropagated right after its forward, and only one pass's activations
        are alive at a time: on the CPU that step took 1.99x a plain CLIP step where one backward through
        all four passes took 2.21x (``benchmarks/safeclip_step.py``, both before the passes ran their last
        block on the pooled token only). With several processes the four
        passes go through DDP as one forward and one backward (:meth:`compute_losses`).
        """
        if self.world_size > 1:
            losses = self.compute_losses(batch)
            self._backward(losses["loss"], scale)
            return {k: v.detach() for k, v in losses.items()}
        ref = self.frozen(batch, self.accelerator.device)
        out = {name: ref["ref_text_safe"].new_zeros((), dtype=torch.float32) for name in (*ALL_LOSS_NAMES, "loss")}
        for part in self.module.parts(batch):
            losses = self._losses(self._embeddings(batch, self.module(batch, parts=(part,)), ref))
            self._backward(losses["loss"], scale)
            for term in TERMS_BY_EMBEDDING[part]:
                out[term] = losses[term].detach()
            out["loss"] = out["loss"] + losses["loss"].detach()
        return out

    __call__ = forward_backward

    def _backward(self, loss: torch.Tensor, scale: float) -> None:
        if not loss.requires_grad:
            # No term reaches a trained tower (e.g. vision-only training, a batch without images): no gradient.
            # Several processes must all run backward, so there it is an error.
            if self.world_size > 1:
                raise InputError("a training batch has no loss term that reaches a trained tower; with several "
                                 "processes every batch needs one: give every item the images the trained tower uses")
            return
        self.accelerator.backward(loss * scale)

    def _embeddings(
        self, batch: dict[str, Any], trainable: dict[str, torch.Tensor | None], ref: RefOutputs | None = None
    ) -> SafeCLIPEmbeddings:
        """The loss inputs: ``trainable`` tower outputs and the frozen reference's (``ref``, computed if not given).

        Token states (``trainable["text_safe_tokens"]``) become their per-row drift from the reference's.
        """
        n, device = int(batch["size"]), self.accelerator.device
        ref = self.frozen(batch, device) if ref is None else ref
        has_v = row_mask(batch["safe_image_index"], n, device)
        if ref["ref_image_safe"] is None:
            has_v = torch.zeros_like(has_v)
        has_g = row_mask(batch["unsafe_image_index"], n, device)
        trainable = dict(trainable)
        states = trainable.pop(TOKEN_TERM, None)
        drift = None if states is None else token_drift(states, ref["ref_text_safe_tokens"])
        return SafeCLIPEmbeddings(ref_text_safe=ref["ref_text_safe"], ref_image_safe=ref["ref_image_safe"],
                                  has_safe_image=has_v, has_unsafe_image=has_g, text_safe_token_drift=drift,
                                  **trainable)

    def _losses(self, emb: SafeCLIPEmbeddings) -> dict[str, torch.Tensor]:
        cfg = self.config
        return safeclip_losses(emb, cfg.weights, logit_scale=cfg.logit_scale, loss_scale=cfg.loss_scale)
