"""Chat templates of the original LLaVA conversation formats, for converted checkpoints.

The original LLaVA code builds prompts with its own ``Conversation`` objects (``llava/conversation.py``)
and picks one by the model's name at inference time; the checkpoints do not record it. These
Jinja templates reproduce the three formats the LLaVA-1.5 / 1.6 releases use, for messages whose
``content`` is a string or a list of ``{"type": "image"}`` / ``{"type": "text", "text": ...}``
parts. As in the original code (``mm_use_im_start_end: false``), each image becomes ``<image>\\n``
at the start of its turn's text.

* ``vicuna`` -- ``conv_vicuna_v1`` / ``llava_v1`` (llava-v1.5-*, llava-v1.6-vicuna-*):
  ``"{system} USER: <image>\\n{prompt} ASSISTANT: {answer}</s>USER: ..."`` with LLaVA's default
  system prompt unless a system message is given.
* ``mistral`` -- ``conv_mistral_instruct`` (llava-v1.6-mistral-7b):
  ``"[INST] <image>\\n{prompt} [/INST] {answer}</s>[INST] ..."``.
* ``chatml`` -- ``conv_chatml_direct`` (llava-v1.6-34b):
  ``"<|im_start|>system\\nAnswer the questions.<|im_end|><|im_start|>user\\n<image>\\n{prompt}<|im_end|>
  <|im_start|>assistant\\n"``.
"""

from __future__ import annotations

VICUNA_SYSTEM = (
    "A chat between a curious human and an artificial intelligence assistant. "
    "The assistant gives helpful, detailed, and polite answers to the human's questions."
)

# One turn's text: the image placeholders first, then the text parts joined by spaces.
_TURN = (
    "{%- macro turn(content) -%}"
    "{%- if content is string -%}{{- content -}}"
    "{%- else -%}"
    "{%- for c in content if c['type'] == 'image' -%}{{- '<image>\\n' -}}{%- endfor -%}"
    "{{- content | selectattr('type', 'equalto', 'text') | map(attribute='text') | join(' ') -}}"
    "{%- endif -%}"
    "{%- endmacro -%}"
)

VICUNA = _TURN + (
    "{%- set ns = namespace(system='" + VICUNA_SYSTEM.replace("'", "\\'") + "') -%}"
    "{%- for m in messages if m['role'] == 'system' -%}{%- set ns.system = turn(m['content']) -%}{%- endfor -%}"
    "{{- ns.system + ' ' -}}"
    "{%- for m in messages if m['role'] != 'system' -%}"
    "{%- if m['role'] == 'user' -%}{{- 'USER: ' + turn(m['content']) + ' ' -}}"
    "{%- else -%}{{- 'ASSISTANT: ' + turn(m['content']) + '</s>' -}}{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- 'ASSISTANT:' -}}{%- endif -%}"
)

MISTRAL = _TURN + (
    "{%- for m in messages if m['role'] != 'system' -%}"
    "{%- if m['role'] == 'user' -%}{{- '[INST] ' + turn(m['content']) + ' [/INST]' -}}"
    "{%- else -%}{{- ' ' + turn(m['content']) + '</s>' -}}{%- endif -%}"
    "{%- endfor -%}"
)

CHATML = _TURN + (
    "{%- set ns = namespace(system='Answer the questions.') -%}"
    "{%- for m in messages if m['role'] == 'system' -%}{%- set ns.system = turn(m['content']) -%}{%- endfor -%}"
    "{{- '<|im_start|>system\\n' + ns.system + '<|im_end|>' -}}"
    "{%- for m in messages if m['role'] != 'system' -%}"
    "{{- '<|im_start|>' + m['role'] + '\\n' + turn(m['content']) + '<|im_end|>' -}}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- '<|im_start|>assistant\\n' -}}{%- endif -%}"
)

TEMPLATES: dict[str, str] = {"vicuna": VICUNA, "mistral": MISTRAL, "chatml": CHATML}
#: The template a text architecture gets unless one is named (llava-v1.6-34b, a Llama-architecture Yi, needs chatml).
DEFAULT_TEMPLATE = {"llama": "vicuna", "mistral": "mistral"}
