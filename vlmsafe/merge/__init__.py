"""Safety merge: recover a VL-adapted model's safety by merging its language model with the aligned LLM.

* :mod:`~vlmsafe.merge.methods` -- tensor merge methods (linear, SLERP, task arithmetic, TIES, DARE).
* :mod:`~vlmsafe.merge.schedule` -- per-layer / regex weight schedules.
* :mod:`~vlmsafe.merge.keymap` -- LLaVA <-> LLM tensor names.
* :mod:`~vlmsafe.merge.localise` -- safety-parameter scores and top-k% masks.
* :mod:`~vlmsafe.merge.streaming` -- the bounded-memory, atomic checkpoint merge.
* :mod:`~vlmsafe.merge.sweep` -- merge at several weights and evaluate each.

Quick start::

    from vlmsafe.merge import MergeConfig, merge_checkpoints
    merge_checkpoints(MergeConfig(vlm="llava", aligned="llama-chat", output="llava-safe", weight=0.4))
"""

from vlmsafe.merge.config import MergeConfig
from vlmsafe.merge.keymap import KeyMap, is_vocab_tensor
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
    apply_mask,
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
    "KeyMap",
    "MergeConfig",
    "MergeResult",
    "Schedule",
    "apply_mask",
    "build_masks",
    "collect_input_norms",
    "dare_linear",
    "dare_ties",
    "is_vocab_tensor",
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
