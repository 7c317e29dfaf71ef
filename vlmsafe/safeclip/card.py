"""The files written beside a fine-tuned Safe-CLIP model: the run's summary and its model card.

``save_pretrained`` writes ``safeclip_training.json`` (:data:`TRAINING_FILE`) and a model card (``README.md``,
:func:`safeclip_card`) in the same atomic output as the weights: the base model, LoRA and loss settings, and a
sha256 of the training data (:func:`dataset_digest`), in the Hugging Face Hub's format.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from vlmsafe.cards import CARD_FILE, digest_lines, display_name, render_card
from vlmsafe.safeclip.config import SafeCLIPTrainingConfig
from vlmsafe.safeclip.state import TrainState

#: The run's summary beside the final model (config, towers, steps).
TRAINING_FILE = "safeclip_training.json"


@dataclass
class RunSummary:
    """What the files beside a model say about the run that trained it."""

    config: SafeCLIPTrainingConfig
    state: TrainState
    backend: Any
    towers: tuple[str, ...]
    train_data: Any = None
    val_data: Any = None


def model_files(run: RunSummary) -> dict[str, str]:
    """``{name: text}`` written beside the final model, inside its atomic output: the run's summary
    (:data:`TRAINING_FILE`) and the model card."""
    info = {"config": run.config.to_dict(), "towers": list(run.towers), "best_step": run.state.best_step,
            "global_step": run.state.global_step}
    return {TRAINING_FILE: json.dumps(info, indent=2) + "\n", CARD_FILE: safeclip_card(run)}


def dataset_digest(data: Any) -> dict[str, Any] | None:
    """The ``data`` block of a Safe-CLIP card: item counts and a sha256 over every item's captions and image
    file names (or, for in-memory images, their pixels), in order -- the same data gives the same hash on any
    machine, wherever its files lie. ``None`` without data."""
    if data is None:
        return None
    items = list(getattr(data, "items", []))

    def image_key(image: Any) -> str:
        if image is None:
            return ""
        if isinstance(image, (str, os.PathLike)):
            return Path(image).name
        if isinstance(image, torch.Tensor):
            return hashlib.sha256(image.detach().cpu().contiguous().numpy().tobytes()).hexdigest()
        tobytes = getattr(image, "tobytes", None)  # a PIL image
        return hashlib.sha256(tobytes()).hexdigest() if callable(tobytes) else type(image).__name__

    lines = (json.dumps([q.safe, q.unsafe, image_key(q.safe_image), image_key(q.unsafe_image)], ensure_ascii=False)
             for q in items)
    with_images = sum(q.safe_image is not None or q.unsafe_image is not None for q in items)
    return {"sha256": digest_lines(lines), "items": len(items), "items_with_images": with_images,
            "description": f"{len(items)} training quadruplets (safe caption, unsafe caption, optional safe / "
                           f"unsafe image), {with_images} with images; sha256 over every item's captions and image "
                           "file names, in order"}


def safeclip_card(run: RunSummary) -> str:
    """The model card of a Safe-CLIP encoder trained by ``run``: base model, towers, LoRA and loss settings,
    the training data's sha256, the best validation metrics."""
    cfg, st, backend = run.config, run.state, run.backend
    hf = backend.kind == "hf"
    base = getattr(getattr(backend.model, "config", None), "name_or_path", None) if hf else backend.model_name
    base = base or None
    lora = ({"lora_r": cfg.lora_r, "lora_alpha": cfg.lora_alpha, "lora_dropout": cfg.lora_dropout,
             "lora_target_modules": list(cfg.lora_target_modules or backend.default_lora_modules)}
            if cfg.use_lora else {})
    settings = {
        "towers": list(run.towers),
        "use_lora": cfg.use_lora,
        **lora,
        "loss_weights": cfg.weights.as_dict(),
        "loss_scale": cfg.loss_scale,
        "logit_scale": cfg.logit_scale,
        "token_layer": cfg.token_layer,
        "learning_rate": cfg.learning_rate,
        "batch_size": cfg.batch_size,
        "gradient_accumulation_steps": cfg.gradient_accumulation_steps,
        "num_epochs": cfg.num_epochs,
        "global_step": st.global_step,
        "best_step": st.best_step,
        "best_metric": cfg.best_metric,
        "best_loss": st.best_loss,
        "best_recall_sum": st.best_recall_sum,
        "seed": cfg.seed,
    }
    data = dataset_digest(run.train_data)
    val = getattr(run.val_data, "items", None)
    if data is not None and val is not None:
        data["validation_items"] = len(val)
    if hf:
        usage = """```python
from transformers import CLIPModel

model = CLIPModel.from_pretrained("THIS_FOLDER_OR_HUB_ID")  # LoRA merged: a standard CLIP checkpoint
```

In a diffusers pipeline, replace the text encoder: `vlmsafe safeclip generate --pipeline PIPELINE_DIR \
--text-encoder THIS_FOLDER_OR_HUB_ID ...`, or `vlmsafe.safeclip.apply_safe_text_encoder`. With vlmsafe:
`vlmsafe.safeclip.load_backend("THIS_FOLDER_OR_HUB_ID")`."""
    else:
        usage = """```python
from vlmsafe.safeclip import load_backend

backend = load_backend("THIS_FOLDER_OR_HUB_ID")  # open_clip_config.json + open_clip_model.safetensors
```"""
    mode = "LoRA (merged into the weights)" if cfg.use_lora else "full fine-tuning"
    return render_card(
        artifact="safe-clip-encoder", method="safe-clip",
        title=f"Safe-CLIP: {display_name(base) or 'a CLIP model'} fine-tuned away from NSFW concepts",
        summary=(f"A CLIP model whose {' and '.join(run.towers)} tower(s) were fine-tuned with the Safe-CLIP "
                 f"objective (Poppi et al., ECCV 2024) by {mode}: unsafe inputs are mapped near their safe "
                 f"counterparts while safe inputs keep the original model's embeddings."),
        base_model=base, relation="finetune", library_name="transformers" if hf else "open_clip",
        pipeline_tag="zero-shot-image-classification", tags=["safe-clip", "clip", "safety"],
        settings=settings, data=data, sections=[("Usage", usage)],
    )
