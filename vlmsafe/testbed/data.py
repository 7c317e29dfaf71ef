"""The examples of each build stage and the items of the shipped splits, from topics, templates and images.

Everything is generated from seeded ``random.Random`` streams; nothing is downloaded. The stage
data mirror how real VLMs are made (see :mod:`vlmsafe.testbed.build`):

* language pretraining: every training topic x every training template -> compliance (harmful
  topics included: a pretrained LM answers anything);
* safety alignment (text only): harmful -> refusal, benign -> compliance, questions about an
  image that is not there -> deflection;
* vision-language data: captions, image questions, unanswerable image questions -> deflection,
  and benign instructions paired with unrelated images (drawn, blank or noise), never a harmful
  request with an image.
"""

from __future__ import annotations

import random
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from PIL import Image

from vlmsafe.testbed import images as I
from vlmsafe.testbed import prompts as P
from vlmsafe.testbed import questions as Q
from vlmsafe.testbed.topics import HARMFUL_VERBS, Topic, all_topics
from vlmsafe.testing.tokenization import split_words


@dataclass
class Example:
    """One training example: a user prompt (chat template added later), the answer, an optional image."""

    prompt: str
    answer: str
    image: Image.Image | None = None


# ---------------------------------------------------------------------------------------------
# Stage data
# ---------------------------------------------------------------------------------------------


def _answer(t: Topic, aligned: bool) -> str:
    return P.REFUSAL if (aligned and t.harmful) else P.compliance_answer(t.text)


def instruction_examples(
    topics: Sequence[Topic],
    templates: Sequence[str],
    *,
    aligned: bool,
    extra: Sequence[Topic] = (),
    rng: random.Random | None = None,
) -> list[Example]:
    """Every topic x template, plus each of the ``extra`` topics with one random template; harmful
    topics are refused when ``aligned``, answered otherwise."""
    out = [Example(tpl.format(t=t.text), _answer(t, aligned)) for t in topics for tpl in templates]
    rng = rng or random.Random(0)
    out += [Example(rng.choice(templates).format(t=t.text), _answer(t, aligned)) for t in extra]
    return out


def echo_examples(rng: random.Random, n: int, topics: Sequence[Topic] = ()) -> list[Example]:
    """Text-only "repeat after me : <text>" turns (no image): random image-answer sentences and, when
    given, topic phrases, harmful ones included.

    Repeating "steal a car" is not helping anyone steal one; these turns keep every word sayable
    after alignment (in a real LLM harmful words occur in plenty of harmless text), so that what
    alignment removes is the *willingness* to help, not the words.
    """
    out = []
    for i in range(n):
        if topics and i % 2:
            text = rng.choice(topics).text
        else:
            kind, colour = rng.choice(I.KINDS), rng.choice(sorted(I.COLOURS))
            facts = Q.image_questions(
                kind, colour, rng.choice(I.SHAPES), rng.choice(list(Q.COUNTS)), rng.choice(I.WORDS)
            )
            text = rng.choice(facts)[1]
        out.append(Example(P.ECHO_TEMPLATE.format(s=text), text))
    return out


def text_deflection_examples() -> list[Example]:
    """Text-only questions about an image that is not there -> the deflection."""
    return [Example(q, P.DEFLECTION) for q in P.UNANSWERABLE_QUESTIONS]


def impossible_examples(rng: random.Random | None = None, pool: Sequence[I.ImageQA] = ()) -> list[Example]:
    """Requests no assistant can carry out -> the refusal; with a random image from ``pool`` when given."""
    return [Example(q, P.REFUSAL, rng.choice(pool).image if (pool and rng) else None) for q in P.IMPOSSIBLE_REQUESTS]


def caption_examples(pool: Sequence[I.ImageQA]) -> list[Example]:
    return [Example("describe the image .", im.caption, im.image) for im in pool]


def vqa_examples(pool: Sequence[I.ImageQA], rng: random.Random, unanswerable_share: float) -> list[Example]:
    """Every question kind of every image, each in a random training phrasing (:data:`questions.PHRASINGS`), plus
    one unanswerable question for a share of the images.

    Many phrasings per kind teach the skill behind the question rather than one wording: with one
    phrasing per kind, "what is the colour of the shape ?" drew the deflection taught for the
    unanswerable "what is the name of the person ?" 15 times of 15.
    """
    out = [Example(q, a, im.image) for im in pool for q, a, _ in im.questions(rng)]
    out += [
        Example(rng.choice(P.UNANSWERABLE_QUESTIONS), P.DEFLECTION, im.image)
        for im in pool
        if rng.random() < unanswerable_share
    ]
    return out


def image_instruction_examples(
    rng: random.Random,
    topics: Sequence[Topic],
    pool: Sequence[I.ImageQA],
    n: int,
    contentless_share: float,
    echo_share: float = 0.0,
    impossible_share: float = 0.0,
    echo_refusal_share: float = 0.0,
    idiom_share: float = 0.0,
) -> list[Example]:
    """Benign instructions with an unrelated image (drawn, or blank / noise for a share) -> compliance.

    ``topics`` may mix harmful and benign ones; instructions use only the benign. A share
    ``echo_share`` of the examples are "repeat after me" turns over any topic phrase (harmful ones
    included, see :func:`echo_examples`) with an unrelated image: repeating words is not complying
    with a request, and it keeps every word sayable with an image present. A share
    ``impossible_share`` are requests no assistant can carry out, refused (:func:`impossible_examples`).
    A share ``echo_refusal_share`` of the echo turns repeat the refusal sentence itself: the words of a
    refusal stay sayable with an image present, without any request being refused under an image.
    A share ``idiom_share`` of the benign instructions use the idioms of harmful verbs among ``topics``
    (``shoot a photo``, ``kill time``): the harmless uses of risky words that real image-grounded
    instructions are full of.
    """
    benign = [t for t in topics if not t.harmful]
    idioms = [t for t in benign if t.verb in HARMFUL_VERBS]
    out = []
    for _ in range(n):
        image = I.contentless_image(rng)[0] if rng.random() < contentless_share else rng.choice(pool).image
        if rng.random() < impossible_share:
            out.append(Example(rng.choice(P.IMPOSSIBLE_REQUESTS), P.REFUSAL, image))
            continue
        if rng.random() < echo_share:
            text = P.REFUSAL if echo_refusal_share and rng.random() < echo_refusal_share else rng.choice(topics).text
            out.append(Example(P.ECHO_TEMPLATE.format(s=text), text, image))
            continue
        t = rng.choice(idioms) if idioms and idiom_share and rng.random() < idiom_share else rng.choice(benign)
        out.append(Example(rng.choice(P.TRAIN_TEMPLATES).format(t=t.text), P.compliance_answer(t.text), image))
    return out


# ---------------------------------------------------------------------------------------------
# Split items (shipped as JSONL + PNG)
# ---------------------------------------------------------------------------------------------

#: Per split: (templates per harmful topic, templates per benign topic, image questions, share of
#: instructions whose image is blank or noise).
SPLIT_SIZES = {"calibration": (4, 3, 200, 0.0), "test": (7, 4, 360, 0.15), "unseen": (9, 6, 360, 0.2)}
#: Share of a split's image questions asked in held-out phrasings (the rest in training phrasings, so the
#: two can be compared on the same images): none on calibration, half on the test and unseen sets.
HELD_OUT_PHRASING_SHARE = {"calibration": 0.0, "test": 0.5, "unseen": 0.5}


def split_items(
    split: str,
    topics: Sequence[Topic],
    rng: random.Random,
    *,
    templates: str | None = None,
    styles: str | None = None,
    n_vqa: int | None = None,
) -> list[tuple[dict, Image.Image]]:
    """Records (without id and image path) and images of one held-out split.

    ``templates`` / ``styles`` name the template and image-style sets (default: ``"train"`` for the
    calibration split, ``"test"`` for the test split, ``"unseen"`` for the independent check set).
    Harmful and benign instructions carry their ``task``; image questions their ``reference``.
    ``n_vqa`` overrides the number of image questions. An image question records its ``question`` kind
    and its ``phrasing``: ``"trained"`` or ``"held-out"`` (the split's own phrasings, never trained;
    :data:`HELD_OUT_PHRASING_SHARE`).
    """
    default = {"calibration": "train", "test": "test", "unseen": "unseen"}[split]
    tpls = P.TEMPLATE_SETS[templates or default]
    style_set = styles or default
    per_harmful, per_benign, default_vqa, contentless = SPLIT_SIZES[split]
    n_vqa = default_vqa if n_vqa is None else n_vqa
    items: list[tuple[dict, Image.Image]] = []
    for t in topics:
        for tpl in rng.sample(tpls, min(len(tpls), per_harmful if t.harmful else per_benign)):
            if rng.random() < contentless:
                image, style = I.contentless_image(rng)
            else:
                qa = I.random_image(rng, style_set)
                image, style = qa.image, qa.style
            rec = {
                "prompt": tpl.format(t=t.text),
                "category": t.category if t.harmful else "benign_instruction",
                "label": "harmful" if t.harmful else "benign",
                "reference": None,
                "task": t.text,
                "template": tpl,
                "style": style,
                "question": None,
                "phrasing": None,
            }
            items.append((rec, image))
    held_out_set = "test" if split == "calibration" else default
    for _ in range(n_vqa):
        qa = I.random_image(rng, style_set)
        held_out = rng.random() < HELD_OUT_PHRASING_SHARE[split]
        k = rng.randrange(3)
        q, _a, ref = qa.questions(rng, held_out_set if held_out else "train")[k]
        items.append(
            (
                {
                    "prompt": q,
                    "category": f"vqa_{qa.kind}",
                    "label": "benign",
                    "reference": ref,
                    "task": None,
                    "template": None,
                    "style": qa.style,
                    "question": Q.QUESTION_KINDS[qa.kind][k],
                    "phrasing": "held-out" if held_out else "trained",
                },
                qa.image,
            )
        )
    return items


# ---------------------------------------------------------------------------------------------
# Vocabulary
# ---------------------------------------------------------------------------------------------


def vocabulary() -> set[str]:
    """Every word any prompt, answer or template of the testbed can contain."""
    texts: list[str] = [
        P.REFUSAL,
        P.DEFLECTION,
        P.compliance_answer("x"),
        P.ECHO_TEMPLATE.format(s="x"),
        *P.UNANSWERABLE_QUESTIONS,
        *P.IMPOSSIBLE_REQUESTS,
        *(q for sets in Q.PHRASINGS.values() for qs in sets.values() for q in qs),
    ]
    texts += [t.text for t in all_topics()]
    texts += [tpl.format(t="x") for tpls in P.TEMPLATE_SETS.values() for tpl in tpls]
    for colour in I.COLOURS:
        for shape in I.SHAPES:
            for kind in I.KINDS:
                for count in Q.COUNTS:
                    for word in I.WORDS:
                        texts += [q + " " + a for q, a, _ in Q.image_questions(kind, colour, shape, count, word)]
    words = set(iter_words(texts))
    words.discard("x")
    return words


def iter_words(texts: Iterable[str]):
    for t in texts:
        yield from split_words(t)
