"""The testbed's image questions: the question kinds each image answers, their phrasings, and the answers.

The language side of :mod:`vlmsafe.testbed.images` (which draws the images): every question kind has
training phrasings and phrasings held out for the test split and for the independent check set
(:data:`PHRASINGS`), so the image-question accuracy the demo reports is measured on wordings the
model never saw in training.
"""

from __future__ import annotations

import random

#: The number words of the shapes an image may show (one to three).
COUNTS = {1: "one", 2: "two", 3: "three"}

#: The question kinds an image of each kind answers, in the order of :func:`image_questions`.
QUESTION_KINDS = {
    "shape": ("colour_shape", "shape", "describe"),
    "count": ("count", "colour_shapes", "describe"),
    "word": ("word", "colour_text", "describe"),
}

#: Phrasings of each question kind: ``train`` (training and the calibration split; the first is the
#: canonical one), ``test`` (only in the test split) and ``unseen`` (only in the independent check set).
#: Held-out phrasings are new combinations of words that training phrasings use, so they test whether
#: the skill follows the question's meaning and not one wording. None of them uses a word of
#: :data:`~vlmsafe.testbed.prompts.UNANSWERABLE_QUESTIONS` that a training phrasing does not.
PHRASINGS: dict[str, dict[str, tuple[str, ...]]] = {
    "colour_shape": {
        "train": (
            "what colour is the shape ?",
            "which colour is the shape ?",
            "what colour is this shape ?",
            "tell me the colour of the shape .",
            "name the colour of the shape .",
            "what colour do you see ?",
            "the shape is what colour ?",
            "can you tell me the colour of this shape ?",
            "what colour does the shape have ?",
            "give me the colour of the shape .",
        ),
        "test": (
            "what is the colour of the shape ?",
            "which colour does this shape have ?",
            "tell me what colour the shape is .",
        ),
        "unseen": (
            "what colour is the shape in the image ?",
            "please name the colour of the shape .",
            "could you tell me the colour of the shape ?",
        ),
    },
    "colour_shapes": {
        "train": (
            "what colour are the shapes ?",
            "which colour are the shapes ?",
            "what colour are these shapes ?",
            "tell me the colour of the shapes .",
            "name the colour of the shapes .",
            "what colour do the shapes have ?",
            "give me the colour of the shapes .",
            "the shapes are what colour ?",
        ),
        "test": (
            "what is the colour of the shapes ?",
            "which colour do these shapes have ?",
            "tell me what colour the shapes are .",
        ),
        "unseen": (
            "what colour are the shapes in the image ?",
            "please name the colour of the shapes .",
            "could you tell me the colour of the shapes ?",
        ),
    },
    "colour_text": {
        "train": (
            "what colour is the text ?",
            "what colour is the word ?",
            "which colour is the text ?",
            "tell me the colour of the word .",
            "name the colour of the text .",
            "what colour does the word have ?",
            "give me the colour of the text .",
            "the word is written in what colour ?",
        ),
        "test": (
            "what is the colour of the text ?",
            "which colour is this word ?",
            "tell me what colour the word is .",
        ),
        "unseen": (
            "what colour is the word in the image ?",
            "please name the colour of the text .",
            "could you tell me the colour of the word ?",
        ),
    },
    "shape": {
        "train": (
            "what shape is in the image ?",
            "what shape is it ?",
            "which shape is shown ?",
            "name the shape .",
            "what shape do you see ?",
            "tell me the shape .",
            "what kind of shape is this ?",
            "which shape is this ?",
            "what is this shape ?",
        ),
        "test": (
            "what is the shape in the image ?",
            "which shape do you see ?",
            "tell me what shape is shown .",
        ),
        "unseen": (
            "what shape is shown in the image ?",
            "what kind of shape do you see ?",
            "please name the shape .",
        ),
    },
    "count": {
        "train": (
            "how many shapes are there ?",
            "how many shapes do you see ?",
            "count the shapes .",
            "how many shapes are in the image ?",
            "what is the number of shapes ?",
            "tell me how many shapes there are .",
            "how many are there ?",
            "give me the number of shapes .",
        ),
        "test": (
            "how many shapes can you see ?",
            "count the shapes in the image .",
            "what number of shapes is shown ?",
        ),
        "unseen": (
            "how many shapes are shown ?",
            "please count the shapes .",
            "tell me the number of shapes in the image .",
        ),
    },
    "word": {
        "train": (
            "what word is written ?",
            "what does the text say ?",
            "read the word .",
            "what word do you see ?",
            "which word is in the image ?",
            "what is written in the image ?",
            "tell me the word .",
            "what word is this ?",
            "read the text .",
        ),
        "test": (
            "what is the word in the image ?",
            "which word is written ?",
            "tell me what word is written .",
        ),
        "unseen": (
            "what word is shown ?",
            "please read the word .",
            "what does the word in the image say ?",
        ),
    },
    "describe": {
        "train": (
            "describe the image .",
            "what is in the image ?",
            "what does the image show ?",
            "describe what you see .",
            "what do you see ?",
            "tell me what is in the image .",
            "give a short description of the image .",
            "what is in this image ?",
        ),
        "test": (
            "what is shown in the image ?",
            "describe this image .",
            "what can you see in the image ?",
        ),
        "unseen": (
            "please describe the image .",
            "tell me what you see in the image .",
            "what does this image show ?",
        ),
    },
}


def image_questions(
    kind: str,
    colour: str,
    shape: str | None = None,
    count: int | None = None,
    word: str | None = None,
    *,
    rng: random.Random | None = None,
    phrasings: str = "train",
) -> list[tuple[str, str, str]]:
    """``(question, answer, reference)`` triples about an image of ``kind`` (see :class:`ImageQA`).

    Every answer opens with words the question kind alone decides ("the shape is", "the image shows"),
    as real VLM answers do; what the image shows comes after. Without ``rng`` each question is its
    kind's canonical phrasing; with it, a random one of the ``phrasings`` set (``"train"``, ``"test"``
    or ``"unseen"``, :data:`PHRASINGS`).
    """
    if kind == "shape":
        answers = [
            (f"the shape is {colour} .", colour),
            (f"it is a {shape} .", shape or ""),
            (f"the image shows {'an' if colour[0] in 'aeiou' else 'a'} {colour} {shape} .", f"{colour} {shape}"),
        ]
    elif kind == "count":
        n = COUNTS[count or 1]
        noun = f"{shape}s" if (count or 1) > 1 else shape
        verb = "are" if (count or 1) > 1 else "is"
        answers = [
            (f"there {verb} {n} {noun} .", n),
            (f"the shapes are {colour} .", colour),
            (f"the image shows {n} {colour} {noun} .", f"{n} {colour}"),
        ]
    else:
        answers = [
            (f"the word is {word} .", word or ""),
            (f"the text is {colour} .", colour),
            (f"the word {word} in {colour} .", f"{word} {colour}"),
        ]
    qkinds = QUESTION_KINDS["word" if kind not in QUESTION_KINDS else kind]
    pick = (lambda qk: rng.choice(PHRASINGS[qk][phrasings])) if rng else (lambda qk: PHRASINGS[qk]["train"][0])
    return [(pick(qk), a, ref) for qk, (a, ref) in zip(qkinds, answers)]
