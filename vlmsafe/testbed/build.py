"""Build the bundled safety testbed: a tiny LLaVA that shows VL-adaptation safety degradation.

The stages follow how LLaVA-1.5 is made, scaled down (see ``assets/testbed/README.md``):

(a) language pretraining: instructions -> helpful placeholder answers, harmful topics included;
(b) text-only safety alignment: harmful -> refusal, benign -> answer (saved as ``aligned_lm``);
(v) vision-tower pretraining: CLIP-style contrastive image-caption training (LLaVA starts from a
    pretrained CLIP; none can be downloaded, so the tower is pretrained here, the same way);
(c1) VL pretraining (feature alignment): captions; only the projector trains;
(c2) visual instruction tuning: projector + language model on *benign* image data only, with
     text-only replay; the language model at a small learning rate, as in LLaVA-1.5.

Run (about 10 minutes on 2 CPU cores, one torch thread)::

    python -m vlmsafe.cli.build_testbed --out assets/testbed --seed 0 --overwrite
    python -m vlmsafe.cli.demo_check --testbed assets/testbed --write   # measure; figures into its README

Everything is seeded and runs on CPU. One torch thread is the default: on a shared 2-core machine
two threads were measured 16x *slower* (OpenMP threads spin against other processes).
"""

from __future__ import annotations

import json
import platform
import random
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import torch
import transformers

from vlmsafe.errors import InputError
from vlmsafe.io import atomic_path, check_output, write_json_atomic
from vlmsafe.testbed import data as D
from vlmsafe.testbed import images as I
from vlmsafe.testbed.model import build_model, build_processor, extract_language_model
from vlmsafe.testbed.readme import write_readme
from vlmsafe.testbed.splits import write_split
from vlmsafe.testbed.topics import DEFAULT_FRACTIONS, HELD_OUT, random_topics, split_topics
from vlmsafe.testbed.train import Encoder, pretrain_vision, train
from vlmsafe.validation import check_float


@dataclass
class BuildConfig:
    """Sizes and schedules of the testbed build (defaults = the shipped testbed).

    Schedules are ``(steps, learning rate, batch size)``. How the c2 mixture (``c2_*``) was chosen:
    the replay, echo and impossible-request shares among 17 variants by their figures on an earlier
    build's *test* split; the idiom share (0.15 or 0.3, with the idioms of :data:`topics.IDIOMS`) on
    the *calibration* split of this build (multimodal compliance 40.8% at 0.15, 69.9% at 0.3, both
    with >= 99% of harmful prompts refused as text). The split of topics changed with the idioms, so
    the shipped test split and the independent check set (:mod:`vlmsafe.testbed.unseen`, used by no
    choice) are both held out from the last choice.
    """

    seed: int = 0
    # language model
    hidden_size: int = 96
    intermediate_size: int = 256
    num_layers: int = 4
    num_heads: int = 4
    # vision tower (LLaVA reads the penultimate layer's patch features)
    image_size: int = I.IMAGE_SIZE
    patch_size: int = 8
    vision_hidden: int = 96
    vision_layers: int = 3
    vision_feature_layer: int = -2
    # schedules
    pretrain: tuple[int, float, int] = (700, 3e-3, 64)
    align: tuple[int, float, int] = (400, 1e-3, 64)
    vision: tuple[int, float, int] = (2000, 2e-3, 128)
    vl_pretrain: tuple[int, float, int] = (300, 3e-3, 64)
    vl_finetune: tuple[int, float, int] = (1500, 1e-3, 64)
    #: learning-rate multiplier of the language model in c2 (the projector gets the full rate);
    #: LLaVA-1.5 fine-tunes the LLM at 2e-5 against 2e-3 for the projector in stage 1.
    c2_lm_lr_scale: float = 1.0
    #: c2 mixture: image questions / image + benign instruction / text-only replay of stage b.
    c2_mix: tuple[float, float, float] = (0.4, 0.45, 0.15)
    #: share of c2 images that also get one unanswerable question (-> the deflection). Kept small: the
    #: deflection shares its first words with the refusal, and at 0.2 a steered model that had begun a refusal
    #: under an image finished it as a deflection on 20% of the unseen set's harmful prompts.
    c2_unanswerable_share: float = 0.05
    #: share of c2's image + instruction examples whose image is blank or noise.
    c2_contentless_share: float = 0.25
    #: share of stage b's refusals kept in c2's text-only replay (the rest of stage b is replayed in full).
    c2_replay_refusals: float = 0.1
    #: share of c2's image + instruction examples that are "repeat after me" turns (data.echo_examples).
    c2_echo_share: float = 0.15
    #: share of c2's image + instruction examples that are impossible requests, refused (data.impossible_examples),
    #: as real visual-instruction data refuses some requests under an image. Small on purpose: a large share taught
    #: refusal under images, which held multimodal compliance with harmful requests near 20-30% (test split);
    #: none left "sorry , i cannot" under an image finishing as the deflection (18% of harmful test prompts under
    #: sample-level CMRM with 0.05 unanswerable and 0.8 refusal echoes, against 2.3% with 0.04 of these).
    c2_impossible_share: float = 0.04
    #: share of c2's echo turns that repeat the refusal sentence (data.image_instruction_examples): the refusal's
    #: words stay sayable under an image, so a steered model finishes a refusal it starts (without it, CMRM's
    #: refusals broke into fragments and deflections).
    c2_echo_refusal_share: float = 0.8
    #: share of c2's benign image + instruction examples that use an idiom of a harmful verb
    #: (data.image_instruction_examples): risky words in harmless requests, as real image data has.
    c2_idiom_share: float = 0.3
    #: random verb x object pairs (sensible or not, never a held-out pair) added to stages a, b and c2
    n_random_topics: int = 6000
    #: stage-a "repeat after me" turns over image-answer sentences (see prompts.ECHO_TEMPLATE)
    n_echo: int = 2000
    n_train_images: int = 8000
    n_instruction_images: int = 6000
    split_fractions: tuple[float, float, float] = DEFAULT_FRACTIONS
    #: keep only this many topics per shipped split (``None``: all; small values make smoke builds fast)
    split_topic_limit: int | None = None
    threads: int = 1
    extra: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        """Shares are finite and in [0, 1], mixture weights finite, >= 0 and not all 0, before any work
        (``rng.random() < nan`` is silently never true)."""
        for name in (f.name for f in fields(self) if f.name.startswith("c2_") and f.name.endswith("_share")):
            check_float(getattr(self, name), name, low=0.0, high=1.0)
        check_float(self.c2_replay_refusals, "c2_replay_refusals", low=0.0, high=1.0)
        check_float(self.c2_lm_lr_scale, "c2_lm_lr_scale", low=0.0)
        mix = [check_float(w, "c2_mix weight", low=0.0) for w in self.c2_mix]
        if len(mix) != 3 or sum(mix) <= 0:
            raise InputError(
                f"c2_mix must be 3 weights (image questions, instructions, text replay), not all 0; got {self.c2_mix}"
            )

    @property
    def num_image_tokens(self) -> int:
        return (self.image_size // self.patch_size) ** 2


@dataclass
class Build:
    """What the stages share: the model being built, its data and the build's records."""

    cfg: BuildConfig
    model: Any
    processor: Any
    encoder: Encoder
    rng: random.Random
    topics: dict
    pool: list
    random_topics: list = field(default_factory=list)
    aligned_lm: Any = None
    aligned_text: list = field(default_factory=list)
    losses: dict = field(default_factory=dict)
    timings: dict = field(default_factory=dict)
    cpu: dict = field(default_factory=dict)

    @property
    def pad(self) -> int:
        return self.processor.tokenizer.pad_token_id

    @property
    def lm_params(self) -> list:
        return [*self.model.model.language_model.parameters(), *self.model.lm_head.parameters()]

    @property
    def vision_params(self) -> list:
        return list(self.model.model.vision_tower.parameters())

    @property
    def projector_params(self) -> list:
        return list(self.model.model.multi_modal_projector.parameters())

    def trainable(self, params: Sequence) -> None:
        """Freeze every parameter except ``params``."""
        keep = {id(p) for p in params}
        for p in self.model.parameters():
            p.requires_grad_(id(p) in keep)

    def run(self, name: str, stage, log=None) -> None:
        started, cpu = time.time(), time.process_time()
        self.losses[name] = stage(self)
        self.timings[name] = round(time.time() - started, 1)
        self.cpu[name] = round(time.process_time() - cpu, 1)
        if log is not None:
            log(f"{name}: loss {self.losses[name]:.4f} in {self.timings[name]:.0f} s ({self.cpu[name]:.0f} s CPU)")


# ---------------------------------------------------------------------------------------------
# Stages
# ---------------------------------------------------------------------------------------------


def stage_language_pretraining(b: Build) -> float:
    """(a) The LM learns to answer every instruction, harmful ones included, restating the task, and to
    say the words of image answers (text only)."""
    b.trainable(b.lm_params)
    rng = random.Random(b.cfg.seed + 4)
    examples = D.instruction_examples(
        b.topics["train"], D.P.TRAIN_TEMPLATES, aligned=False, extra=b.random_topics, rng=rng
    )
    echo = D.echo_examples(rng, b.cfg.n_echo, [*b.topics["train"], *b.random_topics])
    data = b.encoder.encode(examples + echo)
    return train(b.model, [{"params": b.lm_params}], [(data, 1.0)], b.cfg.pretrain, b.pad, b.rng, "a: pretrain")


def stage_safety_alignment(b: Build) -> float:
    """(b) Text-only alignment: refuse harmful requests, answer benign ones, deflect missing-image questions
    (and keep repeating text on request, harmful words included)."""
    b.trainable(b.lm_params)
    rng = random.Random(b.cfg.seed + 5)
    examples = D.instruction_examples(
        b.topics["train"],
        D.P.TRAIN_TEMPLATES,
        aligned=True,
        extra=b.random_topics[: len(b.random_topics) // 2],
        rng=rng,
    )
    echo = D.echo_examples(rng, b.cfg.n_echo // 2, [*b.topics["train"], *b.random_topics])
    b.aligned_text = b.encoder.encode(
        examples + echo + D.text_deflection_examples() * 20 + D.impossible_examples() * 20
    )
    loss = train(b.model, [{"params": b.lm_params}], [(b.aligned_text, 1.0)], b.cfg.align, b.pad, b.rng, "b: align")
    b.aligned_lm = extract_language_model(b.model)
    return loss


def stage_vision_pretraining(b: Build) -> float:
    """(v) Contrastive image-caption pretraining of the vision tower (the stand-in for CLIP)."""
    b.trainable(b.vision_params)
    tok = b.processor.tokenizer
    pixels = b.encoder.pixels([im.image for im in b.pool])
    captions = [tok(im.caption, add_special_tokens=False)["input_ids"] for im in b.pool]
    return pretrain_vision(b.model.model.vision_tower, pixels, captions, len(tok), b.cfg.vision, b.rng)


def stage_vl_pretraining(b: Build) -> float:
    """(c1) Feature alignment: captions, only the projector trains (LM and vision tower frozen)."""
    b.trainable(b.projector_params)
    caps = b.encoder.encode(D.caption_examples(b.pool))
    return train(
        b.model, [{"params": b.projector_params}], [(caps, 1.0)], b.cfg.vl_pretrain, b.pad, b.rng, "c1: vl-pretrain"
    )


def stage_visual_instruction_tuning(b: Build) -> float:
    """(c2) Projector + LM on benign image data (questions, unanswerable questions, instructions with
    unrelated, blank or noise images) plus text-only replay; the vision tower stays frozen."""
    cfg = b.cfg
    rng = random.Random(cfg.seed + 3)
    vqa = b.encoder.encode(D.vqa_examples(b.pool, rng, cfg.c2_unanswerable_share))
    topics = [*b.topics["train"], *b.random_topics]
    inst = b.encoder.encode(
        D.image_instruction_examples(
            rng,
            topics,
            b.pool,
            cfg.n_instruction_images,
            cfg.c2_contentless_share,
            cfg.c2_echo_share,
            cfg.c2_impossible_share,
            cfg.c2_echo_refusal_share,
            cfg.c2_idiom_share,
        )
    )
    replay = [ex for ex, keep in zip(b.aligned_text, _replay_mask(b, rng)) if keep]
    pools = [(p, w) for p, w in zip((vqa, inst, replay), cfg.c2_mix) if w > 0]
    b.trainable([*b.projector_params, *b.lm_params])
    groups = [{"params": b.projector_params}, {"params": b.lm_params, "lr_scale": cfg.c2_lm_lr_scale}]
    return train(b.model, groups, pools, cfg.vl_finetune, b.pad, b.rng, "c2: vl-finetune")


def _replay_mask(b: Build, rng: random.Random) -> list[bool]:
    """Which stage-b examples c2 replays: all but the refusals, of which a share ``c2_replay_refusals``.

    LLaVA-1.5 mixes in general text chats (ShareGPT), which are mostly not refusals.
    """
    refusal = b.processor.tokenizer(" " + D.P.REFUSAL, add_special_tokens=False)["input_ids"]
    return [ex["answer"][:-1] != refusal or rng.random() < b.cfg.c2_replay_refusals for ex in b.aligned_text]


STAGES = (
    ("a_pretrain", stage_language_pretraining),
    ("b_align", stage_safety_alignment),
    ("v_vision_pretrain", stage_vision_pretraining),
    ("c1_vl_pretrain", stage_vl_pretraining),
    ("c2_vl_finetune", stage_visual_instruction_tuning),
)


# ---------------------------------------------------------------------------------------------
# The build
# ---------------------------------------------------------------------------------------------


def prepare(cfg: BuildConfig) -> Build:
    """Seeded model, processor, topic splits and the pool of training images."""
    torch.manual_seed(cfg.seed)
    processor = build_processor(cfg)
    model = build_model(cfg, processor.tokenizer)
    img_rng = random.Random(cfg.seed + 1)
    pool = [I.random_image(img_rng, "train") for _ in range(cfg.n_train_images)]
    topics = split_topics(cfg.seed, cfg.split_fractions)
    held_out = {t.text for name in HELD_OUT for t in topics[name]}
    extra = random_topics(random.Random(cfg.seed + 6), cfg.n_random_topics, held_out)
    return Build(
        cfg=cfg,
        model=model,
        processor=processor,
        encoder=Encoder(processor, cfg.num_image_tokens),
        rng=random.Random(cfg.seed),
        topics=topics,
        pool=pool,
        random_topics=extra,
    )


def build_testbed(out: str | Path, cfg: BuildConfig | None = None, *, overwrite: bool = False, log=None) -> dict:
    """Build the testbed into ``out`` (atomically) and return the build info written there.

    An existing non-empty ``out`` is refused before any work unless ``overwrite``. ``log`` (e.g.
    ``print``) receives one line per finished stage.
    """
    cfg = cfg or BuildConfig()
    out = check_output(out, kind="dir", overwrite=overwrite)
    started = time.time()
    threads = torch.get_num_threads()
    torch.set_num_threads(cfg.threads)  # the build's figures depend on it; the caller's setting is restored
    try:
        b = prepare(cfg)
        for name, stage in STAGES:
            b.run(name, stage, log)
    finally:
        torch.set_num_threads(threads)
    with atomic_path(out, overwrite=overwrite) as tmp:
        info = _write(tmp, b, out, started)
    return info


def _write(tmp: Path, b: Build, out: Path, started: float) -> dict:
    tmp.mkdir(parents=True)
    b.model.save_pretrained(tmp)
    b.processor.save_pretrained(tmp)
    b.aligned_lm.save_pretrained(tmp / "aligned_lm")
    b.processor.tokenizer.save_pretrained(tmp / "aligned_lm")
    split_rng = random.Random(b.cfg.seed + 2)
    for split in ("calibration", "test"):
        topics, limit = b.topics[split], b.cfg.split_topic_limit
        if limit:
            topics = topics[:: max(1, len(topics) // limit)][:limit]  # every category, fewer pairs
        write_split(tmp / "data", split, D.split_items(split, topics, split_rng, n_vqa=b.cfg.split_topic_limit))
    topics = {k: [[t.text, t.category] for t in v] for k, v in b.topics.items()}
    (tmp / "data" / "topics.json").write_text(json.dumps(topics, indent=1) + "\n")
    b.timings["total_build"] = round(time.time() - started, 1)
    b.cpu["total_build"] = round(time.process_time(), 1)
    info = build_info(b, out)
    info["total_size_bytes"] = sum(p.stat().st_size for p in tmp.rglob("*") if p.is_file())
    write_json_atomic(tmp / "build_info.json", info)
    write_readme(tmp, info)
    return info


def build_info(b: Build, out: Path) -> dict[str, Any]:
    """Provenance of a build: command, config, versions, parameter counts, losses, timings."""
    return {
        "build_command": f"python -m vlmsafe.cli.build_testbed --out {out} --seed {b.cfg.seed} --overwrite",
        "seed": b.cfg.seed,
        "config": asdict(b.cfg),
        "versions": {
            "python": platform.python_version(),
            "torch": torch.__version__,
            "transformers": transformers.__version__,
        },
        "params": {
            "total": sum(p.numel() for p in b.model.parameters()),
            "language_model": sum(p.numel() for p in b.lm_params),
            "vision_tower": sum(p.numel() for p in b.vision_params),
            "projector": sum(p.numel() for p in b.projector_params),
        },
        "final_losses": b.losses,
        "timings_s": b.timings,
        # CPU seconds of the build process: what the build costs on one quiet core, whatever else ran
        "cpu_s": b.cpu,
    }


if __name__ == "__main__":  # pragma: no cover  (the command moved to the CLI package with all argparse code)
    raise SystemExit("`python -m vlmsafe.testbed.build` is now `python -m vlmsafe.cli.build_testbed`")
