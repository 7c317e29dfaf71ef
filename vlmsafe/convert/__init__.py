"""Offline checkpoint converters.

* :func:`convert_llava` -- original LLaVA (liuhaotian v1.5 / v1.6, ``LlavaLlamaForCausalLM``) ->
  transformers ``LlavaForConditionalGeneration`` / ``LlavaNextForConditionalGeneration``
  (``vlmsafe convert-llava``).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from vlmsafe._lazy import attach

if TYPE_CHECKING:  # static analysers see the real names; at run time they load on first access
    from vlmsafe.convert.llava import ConvertResult, convert_llava
    from vlmsafe.convert.templates import TEMPLATES

#: Public name -> the module that defines it (``module:attr`` for an alias).
_EXPORTS: dict[str, str] = {
    "ConvertResult": "vlmsafe.convert.llava",
    "TEMPLATES": "vlmsafe.convert.templates",
    "convert_llava": "vlmsafe.convert.llava",
}
__getattr__, __dir__ = attach(__name__, _EXPORTS)

__all__ = ["TEMPLATES", "ConvertResult", "convert_llava"]
