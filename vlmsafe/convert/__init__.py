"""Offline checkpoint converters.

* :func:`convert_llava` -- original LLaVA (liuhaotian v1.5 / v1.6, ``LlavaLlamaForCausalLM``) ->
  transformers ``LlavaForConditionalGeneration`` / ``LlavaNextForConditionalGeneration``
  (``vlmsafe convert-llava``).
"""

from vlmsafe.convert.llava import ConvertResult, convert_llava
from vlmsafe.convert.templates import TEMPLATES

__all__ = ["TEMPLATES", "ConvertResult", "convert_llava"]
