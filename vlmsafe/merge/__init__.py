"""Safety merge: recover a VL-adapted model's safety by merging its language model with the aligned LLM.

* :mod:`~vlmsafe.merge.methods` -- tensor merge methods (linear, SLERP, task arithmetic, TIES, DARE).
* :mod:`~vlmsafe.merge.schedule` -- per-layer / regex weight schedules.
* :mod:`~vlmsafe.merge.keymap` -- the checkpoint layouts: VLM <-> LLM tensor names, vocabulary tensors, buffers.
* :mod:`~vlmsafe.merge.checkpoint` -- the one checkpoint reader (safetensors and ``.bin``, tensor by tensor).
* :mod:`~vlmsafe.merge.localise` -- safety-parameter scores and top-k% masks.
* :mod:`~vlmsafe.merge.plan` -- what happens to every tensor, decided from the headers.
* :mod:`~vlmsafe.merge.streaming` -- the pipelined, bounded-memory, atomic checkpoint merge.
* :mod:`~vlmsafe.merge.sweep` -- merge at several weights and evaluate each.

Quick start::

    from vlmsafe.merge import MergeConfig, merge_checkpoints
    merge_checkpoints(MergeConfig(vlm="llava", aligned="llama-chat", output="llava-safe", weight=0.4))
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from vlmsafe._lazy import attach

if TYPE_CHECKING:  # the public names and their modules, for static tools; at run time
    # vlmsafe._lazy.attach reads this block and loads each name's module on first access
    from vlmsafe.merge.checkpoint import Checkpoint, TensorInfo
    from vlmsafe.merge.config import MergeConfig
    from vlmsafe.merge.keymap import KeyMap, canonical_name, is_buffer, is_vocab_tensor, layer_index
    from vlmsafe.merge.localise import (
        build_masks,
        collect_input_norms,
        load_masks,
        magnitude_scores,
        save_masks,
        topk_mask,
        wanda_scores,
        weight_difference_mask,
        weight_difference_scores,
    )
    from vlmsafe.merge.methods import (
        METHODS,
        PairMethod,
        apply_mask,
        dare,
        dare_linear,
        dare_ties,
        linear,
        merge_pair,
        slerp,
        task_arithmetic,
        ties,
    )
    from vlmsafe.merge.schedule import Schedule
    from vlmsafe.merge.streaming import RECIPE_NAME, MergeResult, merge_checkpoints, plan_merge
    from vlmsafe.merge.sweep import merge_sweep, plot_sweep

__all__ = [
    "METHODS",
    "RECIPE_NAME",
    "Checkpoint",
    "KeyMap",
    "MergeConfig",
    "MergeResult",
    "PairMethod",
    "Schedule",
    "TensorInfo",
    "apply_mask",
    "build_masks",
    "canonical_name",
    "collect_input_norms",
    "dare",
    "dare_linear",
    "dare_ties",
    "is_buffer",
    "is_vocab_tensor",
    "layer_index",
    "linear",
    "load_masks",
    "magnitude_scores",
    "merge_checkpoints",
    "merge_pair",
    "merge_sweep",
    "plan_merge",
    "plot_sweep",
    "save_masks",
    "slerp",
    "task_arithmetic",
    "ties",
    "topk_mask",
    "wanda_scores",
    "weight_difference_mask",
    "weight_difference_scores",
]

__getattr__, __dir__ = attach(__name__)
