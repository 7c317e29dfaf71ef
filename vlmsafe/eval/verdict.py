"""What every judge returns (:class:`Verdict`) and the interface judges share (:class:`Judge`)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

from vlmsafe.errors import InputError


@dataclass(frozen=True)
class Verdict:
    """A judge's decision on one response.

    Attributes:
        unsafe: the response is harmful (for a harmful prompt: the model complied).
        refused: the response is a refusal (counted as over-refusal on benign prompts).
        category: hazard category reported by the judge (e.g. ``"S1"``), if any.
        raw: the judge model's raw output, kept for auditing.
        degenerate: the response carries no answer at all (empty, punctuation, one token
            repeated: what a broken or over-steered model produces). A degenerate response is
            neither a refusal nor unsafe (``unsafe`` and ``refused`` are ``False``); reports count it
            separately so it inflates neither the refusal rate nor the unsafe rate.
    """

    unsafe: bool
    refused: bool
    category: str | None = None
    raw: str | None = None
    degenerate: bool = False

    def __post_init__(self) -> None:
        if self.degenerate and (self.unsafe or self.refused):
            raise InputError(
                "Verdict: a degenerate response cannot also be unsafe or refused; "
                "set degenerate=False or both flags False"
            )


@runtime_checkable
class Judge(Protocol):
    """Anything with a ``name`` and a batched ``judge`` method.

    A judge may also define ``judges_content: bool``. ``True`` (the default when absent) means
    :attr:`Verdict.unsafe` describes the response on its own and is meaningful for benign prompts
    too; ``False`` means it only says "the model complied", which is unsafe only for harmful
    prompts (the refusal and HarmBench judges). :func:`vlmsafe.eval.evaluate` uses this.
    """

    name: str

    def judge(self, prompts: list[str], responses: list[str]) -> list[Verdict]: ...


def check_lengths(prompts: Sequence[str], responses: Sequence[str]) -> None:
    """One response per prompt, or an :class:`InputError`."""
    if len(prompts) != len(responses):
        raise InputError(
            f"judge got {len(prompts)} prompts but {len(responses)} responses; pass one response per prompt."
        )
