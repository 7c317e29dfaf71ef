"""The bundled safety testbed: a tiny LLaVA that shows VL-adaptation safety degradation.

``assets/testbed`` holds a real ``LlavaForConditionalGeneration`` (tiny Llama + tiny CLIP vision
tower + projector, word-level tokenizer, CLIP image processor) built by
``python -m vlmsafe.cli.build_testbed`` from synthetic data, its text-only safety-aligned language
model (``aligned_lm``) and held-out ``calibration`` / ``test`` splits. Text-only harmful prompts
are refused; the same prompts with an image are mostly answered. See ``assets/testbed/README.md``.

Modules: :mod:`~vlmsafe.testbed.topics`, :mod:`~vlmsafe.testbed.prompts` and
:mod:`~vlmsafe.testbed.images` (what the data is made of), :mod:`~vlmsafe.testbed.data` (stage
examples and split items), :mod:`~vlmsafe.testbed.outcome` (the four-outcome judge of the
testbed's answer shapes), :mod:`~vlmsafe.testbed.build` (the stages), and
:mod:`~vlmsafe.testbed.unseen` (an independent check set drawn from held-back topics, templates
and image styles).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from vlmsafe.errors import FileFormatError, InputError
from vlmsafe.resources import bundled_asset

__all__ = ["SPLITS", "load_aligned_lm", "load_split", "load_testbed", "testbed_dir"]

SPLITS = ("calibration", "test")
_ENV = "VLMSAFE_TESTBED"


def testbed_dir(path: str | os.PathLike[str] | None = None) -> Path:
    """Folder of the testbed: ``path``, else ``$VLMSAFE_TESTBED``, else the bundled one (:mod:`vlmsafe.resources`)."""
    if path is not None:
        return Path(path)
    if os.environ.get(_ENV):
        return Path(os.environ[_ENV])
    return bundled_asset("testbed")


def _require(d: Path, what: str) -> None:
    if not d.exists():
        raise FileFormatError(
            f"testbed {what} not found at {d}. Set ${_ENV} to the testbed folder, or rebuild it with "
            f"`python -m vlmsafe.cli.build_testbed --out {testbed_dir()}`."
        )


def load_testbed(path: str | os.PathLike[str] | None = None):
    """Load the testbed VLM and its processor, offline: ``(LlavaForConditionalGeneration, LlavaProcessor)``.

    The model is returned in eval mode, fp32, on CPU, loaded like every other model
    (:func:`vlmsafe.loading.load_model`: safetensors only, no remote code, its weights' fingerprint kept).
    """
    from vlmsafe.loading import load_model

    d = testbed_dir(path)
    _require(d / "config.json", "model")
    return load_model(d, kind="vlm")


def load_aligned_lm(path: str | os.PathLike[str] | None = None):
    """The text-only safety-aligned language model of build stage (b): ``(LlamaForCausalLM, tokenizer)``.

    Its weight names match the VLM's language model (``model.layers.N.*`` here,
    ``model.language_model.layers.N.*`` in the VLM), so it is the base of a safety merge.
    """
    from vlmsafe.loading import load_model

    d = testbed_dir(path) / "aligned_lm"
    _require(d / "config.json", "aligned language model")
    return load_model(d, kind="causal_lm")


def load_split(name: str, path: str | os.PathLike[str] | None = None) -> list[dict]:
    """Items of a held-out split (``"calibration"`` or ``"test"``).

    Each item is the JSONL record ``{"id", "prompt", "image", "category", "label", "reference",
    "task", "template", "style"}`` (see :mod:`vlmsafe.testbed.splits`; ``image`` relative to the
    JSONL file) plus ``"image_path"``, the absolute path of the image.
    """
    if name not in SPLITS:
        raise InputError(f"unknown testbed split {name!r}; choose one of {', '.join(SPLITS)}.")
    f = testbed_dir(path) / "data" / f"{name}.jsonl"
    _require(f, f"split {name!r}")
    items = []
    for n, line in enumerate(f.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError as e:
            raise FileFormatError(f"{f}, line {n}: not valid JSON ({e.msg}); rebuild the testbed.") from None
        missing = {"id", "prompt", "image", "category", "label", "reference", "task", "template", "style"} - set(rec)
        if missing:
            raise FileFormatError(f"{f}, line {n}: missing key(s) {sorted(missing)}; rebuild the testbed.")
        rec["image_path"] = str(f.parent / rec["image"]) if rec["image"] else None
        items.append(rec)
    return items
