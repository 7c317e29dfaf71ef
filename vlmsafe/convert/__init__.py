"""Offline checkpoint converters.

* :func:`convert_llava` -- original LLaVA (liuhaotian v1.5 / v1.6, ``LlavaLlamaForCausalLM``) ->
  transformers ``LlavaForConditionalGeneration`` / ``LlavaNextForConditionalGeneration``
  (``vlmsafe convert-llava``).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from vlmsafe._lazy import attach

if TYPE_CHECKING:  # the public names and their modules, for static tools; at run time
    # vlmsafe._lazy.attach reads this block and loads each name's module on first access
    from vlmsafe.convert.llava import ConvertResult, convert_llava
    from vlmsafe.convert.templates import TEMPLATES

__all__ = ["TEMPLATES", "ConvertResult", "convert_llava"]

__getattr__, __dir__ = attach(__name__)
