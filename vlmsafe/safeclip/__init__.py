"""Safe-CLIP: fine-tune CLIP encoders so unsafe inputs embed like their safe counterparts.

Poppi et al., ECCV 2024. Pieces:

* :mod:`~vlmsafe.safeclip.losses` — the eight loss terms, returned separately, and an optional ninth,
  ``text_safe_tokens`` (not in the paper, weight 0 by default), that keeps safe captions' per-token text
  states where a diffusion UNet reads them.
* :mod:`~vlmsafe.safeclip.backends` — ``transformers`` ``CLIPModel`` and ``open_clip`` behind one interface.
* :mod:`~vlmsafe.safeclip.data` — JSONL quadruplets, the ViSU-Text layout + COCO, text-only mode;
  :mod:`~vlmsafe.safeclip.images` loads their images, :mod:`~vlmsafe.safeclip.batches` collates them.
* :mod:`~vlmsafe.safeclip.trainer` — LoRA / full fine-tuning with a truly frozen reference,
  ``accelerate`` multi-process, resumable safetensors+JSON checkpoints, early stopping; a facade over
  :mod:`~vlmsafe.safeclip.config` (options), :mod:`~vlmsafe.safeclip.state` (where a run is, early stopping),
  :mod:`~vlmsafe.safeclip.weights` (LoRA or tower weights), :mod:`~vlmsafe.safeclip.reference` (frozen
  reference and its output cache), :mod:`~vlmsafe.safeclip.step` (the loss of a batch),
  :mod:`~vlmsafe.safeclip.distributed`, :mod:`~vlmsafe.safeclip.loop` (the training loop),
  :mod:`~vlmsafe.safeclip.evaluation` (validation), :mod:`~vlmsafe.safeclip.checkpoint` (checkpoints) and
  :mod:`~vlmsafe.safeclip.card` (the files beside the final model).
* options are declared once in dataclass field metadata (help, range, flag; :mod:`vlmsafe.options`),
  checked in the library and turned into command-line flags by :mod:`vlmsafe.cli.options`.
* :mod:`~vlmsafe.safeclip.pairs` — the safe→unsafe sentence converter (LoRA on a causal LM).
* :mod:`~vlmsafe.safeclip.retrieval` — Recall@K tables (S→V, U→V, U→(V∪G), V→S, G→S).
* :mod:`~vlmsafe.safeclip.integrations` — swap the encoders into diffusers and LLaVA.

CLI: ``vlmsafe safeclip train | eval | pairs``; ``vlmsafe safeclip eval`` with no arguments
prints the bundled testbed's (:mod:`vlmsafe.testbed.safeclip`) retrieval table (original vs Safe-CLIP on
held-out scenes).

Python::

    from vlmsafe.safeclip import HFCLIPBackend, QuadrupletDataset, SafeCLIPTrainer, SafeCLIPTrainingConfig

    backend = HFCLIPBackend.from_pretrained("openai/clip-vit-large-patch14")
    train = QuadrupletDataset.from_visu("visu_train.json", coco_dir="coco")   # text-only without coco_dir
    val = QuadrupletDataset.from_visu("visu_val.json", coco_dir="coco")
    trainer = SafeCLIPTrainer(backend, SafeCLIPTrainingConfig(num_epochs=2), train, val, output_dir="runs/sc")
    trainer.train()                        # trainer.train(resume_from="latest") continues a run
    trainer.save_pretrained("runs/sc/model")   # CLIPModel folder, LoRA merged, best validation weights

    pipe = apply_safe_text_encoder(pipe, "runs/sc/model")    # diffusers
    llava = apply_safe_vision_encoder(llava, "runs/sc/model")  # LLaVA

Several processes: launch the same script (or ``-m vlmsafe.cli safeclip train ...``) with
``torchrun --nproc_per_node N`` or ``accelerate launch`` (GPUs); the global batch is split across
processes and embeddings are all-gathered, so results match a single process. On CPU-only
machines ``torchrun`` gives a gloo run (``accelerate launch --cpu`` starts only one process).

Checkpoints are safetensors + JSON only (trainable weights, AdamW moments, RNG state; step,
scheduler, early-stopping state and config as JSON): resuming never unpickles anything.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from vlmsafe._lazy import attach

if TYPE_CHECKING:  # the public names and their modules, for static tools; at run time
    # vlmsafe._lazy.attach reads this block and loads each name's module on first access
    from vlmsafe.safeclip.backends import CLIPBackend, HFCLIPBackend, OpenCLIPBackend, load_backend
    from vlmsafe.safeclip.batches import QuadrupletCollator
    from vlmsafe.safeclip.data import Quadruplet, QuadrupletDataset, load_dataset
    from vlmsafe.safeclip.integrations import (
        apply_safe_text_encoder,
        apply_safe_vision_encoder,
        load_safe_text_encoder,
    )
    from vlmsafe.safeclip.losses import (
        ALL_LOSS_NAMES,
        LOSS_NAMES,
        SafeCLIPEmbeddings,
        SafeCLIPLossWeights,
        clip_nce,
        cosine_distance,
        safeclip_losses,
        token_drift,
    )
    from vlmsafe.safeclip.pairs import PairConverterConfig, generate_unsafe, load_pairs, train_pair_converter
    from vlmsafe.safeclip.retrieval import (
        embed_quadruplets,
        format_table,
        recall_at_k,
        retrieval_metrics,
        retrieval_table,
    )
    from vlmsafe.safeclip.trainer import SafeCLIPTrainer, SafeCLIPTrainingConfig, TrainingResult, train_safeclip

__all__ = [
    "ALL_LOSS_NAMES",
    "LOSS_NAMES",
    "CLIPBackend",
    "HFCLIPBackend",
    "OpenCLIPBackend",
    "PairConverterConfig",
    "Quadruplet",
    "QuadrupletCollator",
    "QuadrupletDataset",
    "SafeCLIPEmbeddings",
    "SafeCLIPLossWeights",
    "SafeCLIPTrainer",
    "SafeCLIPTrainingConfig",
    "TrainingResult",
    "apply_safe_text_encoder",
    "apply_safe_vision_encoder",
    "clip_nce",
    "cosine_distance",
    "embed_quadruplets",
    "format_table",
    "generate_unsafe",
    "load_backend",
    "load_dataset",
    "load_pairs",
    "load_safe_text_encoder",
    "recall_at_k",
    "retrieval_metrics",
    "retrieval_table",
    "safeclip_losses",
    "token_drift",
    "train_pair_converter",
    "train_safeclip",
]

__getattr__, __dir__ = attach(__name__)
