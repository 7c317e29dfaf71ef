"""The testbed's synthetic data: topics, templates, image styles and split items (no model needed)."""

from __future__ import annotations

import random
from collections import Counter

import numpy as np

from vlmsafe.testbed import data as D
from vlmsafe.testbed import images as I
from vlmsafe.testbed import prompts as P
from vlmsafe.testbed import questions as Q
from vlmsafe.testbed.topics import (
    CATEGORIES,
    HARMFUL_OBJECTS,
    HARMFUL_VERBS,
    IDIOMS,
    all_topics,
    is_harmful,
    random_topics,
    split_topics,
)


def test_harm_is_decidable_from_words():
    for t in all_topics():
        harmful_verb = t.verb in HARMFUL_VERBS and t.obj not in IDIOMS.get(t.verb, ())
        assert (
            t.harmful
            == (harmful_verb or any(t.obj in objs for objs in HARMFUL_OBJECTS.values()))
            == is_harmful(t.verb, t.obj)
        )
        assert (t.category in CATEGORIES) == t.harmful
    # harmful verbs also occur in harmless idioms, so refusing needs the whole phrase
    idioms = {t.text for t in all_topics() if t.verb in HARMFUL_VERBS and not t.harmful}
    assert {"steal the show", "shoot a photo", "kill time"} <= idioms
    for t in random_topics(random.Random(0), 500, set()):
        assert t.harmful == is_harmful(t.verb, t.obj)


def test_every_harmful_verb_with_a_harmless_sense_is_trained_in_it():
    """A harmful verb loses its refusal under an image only if VL tuning showed it used harmlessly with
    images: every verb but the two without a harmless sense has an idiom in the *training* topics."""
    assert set(HARMFUL_VERBS) - set(IDIOMS) == {"shoplift", "hurt"}
    train = split_topics(0)["train"]
    trained = {t.verb for t in train if t.verb in HARMFUL_VERBS and not t.harmful}
    assert trained == set(IDIOMS)


def test_splits_are_disjoint_new_combinations_with_every_category():
    s = split_topics(0)
    names = {k: {t.text for t in v} for k, v in s.items()}
    keys = list(names)
    for i, a in enumerate(keys):
        for b in keys[i + 1 :]:
            assert not names[a] & names[b], (a, b)
    train = s["train"]
    for split in ("calibration", "test", "unseen"):
        assert set(CATEGORIES) <= {t.category for t in s[split]}, split
        for t in s[split]:  # held-out pairs are new combinations of trained words
            assert any(u.verb == t.verb for u in train) and any(u.obj == t.obj for u in train)
    assert set(CATEGORIES) <= {t.category for t in train}
    assert s == split_topics(0), "splits must be deterministic"
    assert s != split_topics(1)


def test_templates_many_disjoint_and_made_of_trained_words():
    assert len(P.TRAIN_TEMPLATES) >= 20 and len(P.TEST_TEMPLATES) >= 10 and len(P.UNSEEN_TEMPLATES) >= 10
    sets = [set(P.TRAIN_TEMPLATES), set(P.TEST_TEMPLATES), set(P.UNSEEN_TEMPLATES)]
    assert not (sets[0] & sets[1]) and not (sets[0] & sets[2]) and not (sets[1] & sets[2])
    for tpls in P.TEMPLATE_SETS.values():
        assert sum("help me" in t or "need help" in t or "like help" in t or "want help" in t for t in tpls) >= 3
    trained = set(
        D.iter_words(
            [t.format(t="x") for t in P.TRAIN_TEMPLATES]
            + [P.REFUSAL, P.DEFLECTION, P.compliance_answer("x"), *P.UNANSWERABLE_QUESTIONS]
        )
    )
    for tpl in P.TEST_TEMPLATES + P.UNSEEN_TEMPLATES:
        assert set(D.iter_words([tpl.format(t="x")])) <= trained, tpl


def test_style_sets_are_disjoint_and_images_vary():
    styles = [set(I.TRAIN_STYLES), set(I.TEST_STYLES), set(I.UNSEEN_STYLES)]
    fonts = [set(I.TRAIN_FONTS), set(I.TEST_FONTS), set(I.UNSEEN_FONTS)]
    for group in (styles, fonts):
        assert not (group[0] & group[1]) and not (group[0] & group[2]) and not (group[1] & group[2])
    rng = random.Random(0)
    sizes, means = set(), []
    for split in ("train", "test", "unseen"):
        for _ in range(60):
            qa = I.random_image(rng, split)
            assert qa.style in I.STYLE_SETS[split][0]
            sizes.add(qa.image.size)
            means.append(np.asarray(qa.image).mean())
    assert len(sizes) >= 4 and np.std(means) > 20  # canvas sizes and backgrounds differ


def test_colour_shades_stay_in_their_band():
    import colorsys

    rng = random.Random(0)
    for name, ((h0, h1), s0, v0) in I.COLOURS.items():
        for _ in range(50):
            r, g, b = I.shade(rng, name)
            h, s, v = colorsys.rgb_to_hsv(r / 255, g / 255, b / 255)
            hue = h * 360 if h * 360 <= h1 + 1 else h * 360 - 360
            assert h0 - 1 <= hue <= h1 + 1 and s >= s0 - 0.02 and v >= v0 - 0.02, name


def test_questions_need_the_image():
    qa = I.make_image(random.Random(3), "paper", kind="count")
    q = {question: ref for question, _a, ref in qa.questions()}
    assert q["how many shapes are there ?"] == Q.COUNTS[qa.count]
    assert qa.caption.startswith(f"the image shows {Q.COUNTS[qa.count]}")


def test_image_questions_come_in_many_phrasings_held_out_by_split():
    """Each question kind has many training phrasings and its own test and unseen phrasings, disjoint, made
    of words training text uses; none is an unanswerable question (those alone are taught the deflection)."""
    trained_text = [q for kind in Q.PHRASINGS.values() for q in kind["train"]]
    trained_text += [t.format(t="x") for t in P.TRAIN_TEMPLATES] + list(P.UNANSWERABLE_QUESTIONS)
    for kind in ("colour", "shape", "count", "word", "describe"):
        assert any(k.startswith(kind) for k in Q.PHRASINGS), kind
    trained = set(D.iter_words(trained_text))
    for name, sets in Q.PHRASINGS.items():
        assert len(sets["train"]) >= 8 and len(sets["test"]) >= 3 and len(sets["unseen"]) >= 3, name
        train, test, unseen = (set(sets[k]) for k in ("train", "test", "unseen"))
        assert not (train & test) and not (train & unseen) and not (test & unseen), name
        for q in test | unseen:
            assert set(D.iter_words([q])) <= trained, q
    every = {q for sets in Q.PHRASINGS.values() for qs in sets.values() for q in qs}
    assert not every & set(P.UNANSWERABLE_QUESTIONS)
    # the rephrasings the first testbed could not answer are held out, so the test split measures them
    assert "what is the colour of the shape ?" in Q.PHRASINGS["colour_shape"]["test"]
    assert "what is the word in the image ?" in Q.PHRASINGS["word"]["test"]


def test_training_questions_vary_and_only_unanswerable_ones_deflect():
    rng = random.Random(0)
    pool = [I.random_image(rng, "train") for _ in range(200)]
    examples = D.vqa_examples(pool, random.Random(1), unanswerable_share=0.2)
    asked = Counter(ex.prompt for ex in examples)
    for name, sets in Q.PHRASINGS.items():
        assert sum(q in asked for q in sets["train"]) >= 5, name  # many phrasings per kind, not one
        assert not any(q in asked for q in sets["test"] + sets["unseen"]), name  # held out from training
    deflected = {ex.prompt for ex in examples if ex.answer == P.DEFLECTION}
    assert deflected and deflected <= set(P.UNANSWERABLE_QUESTIONS)
    # canonical phrasings without a random generator (the first of each training set)
    canonical = [Q.PHRASINGS[k]["train"][0] for k in Q.QUESTION_KINDS[pool[0].kind]]
    assert [q for q, _, _ in pool[0].questions()] == canonical


def test_split_image_questions_record_kind_and_phrasing():
    s = split_topics(0)
    for split, held_out in (("calibration", None), ("test", "test"), ("unseen", "unseen")):
        recs = [r for r, _ in D.split_items(split, s[split][:2], random.Random(0), n_vqa=200)]
        vqa = [r for r in recs if r["reference"] is not None]
        assert all(r["question"] in Q.PHRASINGS for r in vqa)
        assert all(r["question"] is None and r["phrasing"] is None for r in recs if r["reference"] is None)
        for r in vqa:
            phrasings = Q.PHRASINGS[r["question"]]
            assert r["prompt"] in phrasings["train" if r["phrasing"] == "trained" else held_out], (split, r)
        shares = Counter(r["phrasing"] for r in vqa)
        if held_out is None:
            assert set(shares) == {"trained"}
        else:
            assert 70 <= shares["held-out"] <= 130, shares  # about half, to compare with trained phrasings


def test_split_items_sizes_and_fields():
    s = split_topics(0)
    items = D.split_items("test", s["test"], random.Random(2))
    recs = [r for r, _ in items]
    harmful = [r for r in recs if r["label"] == "harmful"]
    benign = [r for r in recs if r["label"] == "benign"]
    assert len(harmful) >= 500 and len(benign) >= 500
    assert {r["template"] for r in recs if r["template"]} <= set(P.TEST_TEMPLATES)
    drawn = {r["style"] for r in recs} - {"blank", "noise"}
    assert drawn <= set(I.TEST_STYLES) and {"blank", "noise"} <= {r["style"] for r in recs}
    assert set(CATEGORIES) == {r["category"] for r in harmful}
    for r in recs:
        assert (r["task"] is None) == (r["reference"] is not None)
        if r["task"]:
            assert r["task"] in r["prompt"]
    cats = Counter(r["category"] for r in recs if r["reference"])
    assert set(cats) == {"vqa_shape", "vqa_count", "vqa_word"}


def test_vocabulary_covers_all_text():
    vocab = D.vocabulary()
    s = split_topics(0)
    for split in ("calibration", "test", "unseen"):
        for rec, _ in D.split_items(split, s[split], random.Random(0)):
            assert set(D.iter_words([rec["prompt"]])) <= vocab, rec["prompt"]


def test_image_instructions_never_pair_a_harmful_request_with_an_image():
    """c2's image + instruction data: benign requests answered, echo turns repeated, impossible requests
    refused; with ``echo_refusal_share`` a share of the echo turns repeat the refusal sentence."""
    rng = random.Random(0)
    topics = split_topics(0)["train"]
    pool = [I.random_image(rng, "train") for _ in range(4)]
    harmful = {t.text for t in topics if t.harmful}

    def kinds(**kw):
        out = D.image_instruction_examples(random.Random(1), topics, pool, 400, 0.25, **kw)
        assert all(ex.image is not None for ex in out)
        for ex in out:
            if not ex.prompt.startswith("repeat after me"):
                assert not any(h in ex.prompt for h in harmful), ex.prompt
        return Counter(
            "echo_refusal" if ex.prompt == P.ECHO_TEMPLATE.format(s=P.REFUSAL) else
            "refusal" if ex.answer == P.REFUSAL else
            "echo" if ex.prompt.startswith("repeat after me") else "comply"
            for ex in out
        )

    plain = kinds(echo_share=0.2, impossible_share=0.1)
    assert plain["echo_refusal"] == 0 and 20 <= plain["refusal"] <= 60 and plain["echo"] >= 40
    only_refusal_echo = kinds(echo_share=0.2, echo_refusal_share=1.0)
    assert only_refusal_echo["echo"] == 0 and only_refusal_echo["refusal"] == 0
    assert 50 <= only_refusal_echo["echo_refusal"] <= 110
    with_idioms = D.image_instruction_examples(random.Random(1), topics, pool, 400, 0.25, idiom_share=0.5)
    idioms = {t.text for t in topics if not t.harmful and t.verb in HARMFUL_VERBS}
    n_idiom = sum(any(i in ex.prompt for i in idioms) for ex in with_idioms)
    assert 150 <= n_idiom <= 260 and all(ex.answer.startswith(P.COMPLIANCE_PREFIX) for ex in with_idioms)
