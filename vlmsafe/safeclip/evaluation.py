"""Validation during Safe-CLIP training: the losses and the recall sum that early stopping watches.

The recall sum is R@1 of T(S)→I0(V) + T(U)→I0(V) + I(V)→T0(S) + I(G)→T0(S): each trained tower
queried against the frozen reference's other tower, as the NCE terms train them (the reference
code's criterion). Without images it is R@1 of T(S)→T0(S) + T(U)→T0(S).

With the ``text_safe_tokens`` term on, the validation loss includes it: the safe captions' token states
are computed, chunk by chunk, by the trained and the reference text tower, and only their per-item drift
is kept.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from vlmsafe.safeclip.config import SafeCLIPTrainingConfig
from vlmsafe.safeclip.data import QuadrupletDataset
from vlmsafe.safeclip.losses import ALL_LOSS_NAMES, SafeCLIPEmbeddings, safeclip_losses, token_drift
from vlmsafe.safeclip.reference import FrozenReference
from vlmsafe.safeclip.retrieval import embed_quadruplets, recall_at_k

Embedded = dict[str, torch.Tensor | None]


class Evaluator:
    """Validation of the trained towers of ``model`` against the frozen reference ``frozen``.

    ``module`` (default ``model``) is the module whose train/eval mode is switched while embedding (the prepared
    trainable towers, which wrap ``model``); ``token_layer`` is the layer of the ``text_safe_tokens`` term
    (``None``: the term is off). The reference's embeddings of a validation set are computed once per dataset
    object and reused: the reference is frozen.
    """

    def __init__(
        self,
        backend: Any,
        model: nn.Module,
        frozen: FrozenReference,
        config: SafeCLIPTrainingConfig,
        *,
        towers: tuple[str, ...],
        token_layer: str | None,
        accelerator: Any,
        module: nn.Module | None = None,
    ):
        self.backend, self.model, self.frozen, self.config = backend, model, frozen, config
        self.towers, self.token_layer, self.accelerator = towers, token_layer, accelerator
        self.module = model if module is None else module
        self._reference: tuple[QuadrupletDataset, Embedded] | None = None

    @torch.no_grad()
    def evaluate(self, data: QuadrupletDataset) -> dict[str, float]:
        """Validation losses (averaged over ``eval_batch_size`` chunks), R@1 per direction and ``recall_sum``."""
        cur, ref = self.embed(data)
        metrics = validation_losses(cur, ref, len(data), self.config)
        recalls = validation_recalls(cur, ref)
        metrics.update({f"R@1 {k}": v for k, v in recalls.items()})
        metrics["recall_sum"] = float(sum(recalls.values()))
        return metrics

    def embed(self, data: QuadrupletDataset) -> tuple[Embedded, Embedded]:
        """The trained towers' embeddings of ``data`` and the reference's ``T0(S)``, ``I0(V)``."""
        was_training = self.module.training
        self.module.eval()
        bs = self.config.eval_batch_size
        try:
            with self.accelerator.autocast():
                cur = embed_quadruplets(self.backend, self.model, data, batch_size=bs, towers=self.towers,
                                        progress=False)
                if self._reference is None or self._reference[0] is not data:
                    with self.frozen.active() as ref_model:
                        ref = embed_quadruplets(self.backend, ref_model, data, batch_size=bs,
                                                towers=("text", "vision"), progress=False, texts=("safe",),
                                                images=("safe",))
                    self._reference = (data, ref)
                if self.token_layer is not None:
                    cur["S_token_drift"] = self._token_drift(data)
        finally:
            if was_training:
                self.module.train()
        return cur, self._reference[1]

    def _token_drift(self, data: QuadrupletDataset) -> torch.Tensor:
        """Per item, :func:`~vlmsafe.safeclip.losses.token_drift` of the trained text tower's safe-caption token
        states from the reference's (``eval_batch_size`` captions at a time; only the ``[N]`` result is kept)."""
        bs, device, layer = self.config.eval_batch_size, self.accelerator.device, self.token_layer
        drifts = []
        for start in range(0, len(data), bs):
            tokens = self.backend.tokenize_padded([q.safe for q in data.items[start : start + bs]])
            tokens = {k: v.to(device) for k, v in tokens.items()}
            _, states = self.backend.encode_text_states(self.model, tokens, layer)
            with self.frozen.active() as ref_model:
                _, ref_states = self.backend.encode_text_states(ref_model, tokens, layer)
            drifts.append(token_drift(states, ref_states).cpu())
        return torch.cat(drifts)


def validation_losses(cur: Embedded, ref: Embedded, n: int, config: SafeCLIPTrainingConfig) -> dict[str, float]:
    """The terms and ``loss`` over ``eval_batch_size`` chunks (NCE negatives within a chunk).

    ``cur["S_token_drift"]`` (``[N]``, when the token term is on) is the per-item value of ``text_safe_tokens``.
    """
    bs = config.eval_batch_size
    totals = dict.fromkeys((*ALL_LOSS_NAMES, "loss"), 0.0)
    for start in range(0, n, bs):
        sl = slice(start, start + bs)

        def take(x: torch.Tensor | None, sl: slice = sl) -> torch.Tensor | None:
            return None if x is None else x[sl]

        emb = SafeCLIPEmbeddings(
            ref_text_safe=ref["S"][sl],
            ref_image_safe=take(ref.get("V")),
            text_safe=take(cur.get("S")),
            text_nsfw=take(cur.get("U")),
            image_safe=take(cur.get("V")),
            image_nsfw=take(cur.get("G")),
            has_safe_image=ref["has_V"][sl],
            has_unsafe_image=ref["has_G"][sl],
            text_safe_token_drift=take(cur.get("S_token_drift")),
        )
        out = safeclip_losses(emb, config.weights, logit_scale=config.logit_scale, loss_scale=config.loss_scale)
        rows = min(bs, n - start)
        for k in totals:
            totals[k] += float(out[k]) * rows
    return {k: v / n for k, v in totals.items()}


def validation_recalls(cur: Embedded, ref: Embedded) -> dict[str, float]:
    """R@1 of each trained tower against the reference's other tower (text against text without images)."""
    has_v, has_g = ref["has_V"], ref["has_G"]
    recalls: dict[str, float] = {}
    S = cur.get("S") if cur.get("S") is not None else ref["S"]
    U = cur.get("U")
    if has_v.any():
        V0 = ref["V"][has_v]
        recalls["S->V0"] = recall_at_k(S[has_v], V0, (1,))[1]
        if U is not None:
            recalls["U->V0"] = recall_at_k(U[has_v], V0, (1,))[1]
        if cur.get("V") is not None:
            recalls["V->S0"] = recall_at_k(cur["V"][has_v], ref["S"][has_v], (1,))[1]
        if cur.get("G") is not None and has_g.any():
            recalls["G->S0"] = recall_at_k(cur["G"][has_g], ref["S"][has_g], (1,))[1]
    else:
        recalls["S->S0"] = recall_at_k(S, ref["S"], (1,))[1]
        if U is not None:
            recalls["U->S0"] = recall_at_k(U, ref["S"], (1,))[1]
    return recalls
