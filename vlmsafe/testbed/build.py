"""Build the bundled safety testbed: a tiny LLaVA that shows VL-adaptation safety degradation.

The stages mirror how real VLMs are made (see ``assets/testbed/README.md``):

(a) language pretraining: instructions -> helpful placeholder answers, harmful topics included;
(b) text-only safety alignment: harmful -> refusal, benign -> answer (saved as ``aligned_lm``);
(c1) vision-language pretraining: captions; LM frozen, vision tower + projector trained (no
     pretrained CLIP exists offline, so the vision tower is learned here);
(c2) visual instruction tuning: projector + LM on *benign* image-grounded data only.

Run::

    python -m vlmsafe.testbed.build --out assets/testbed --seed 0

Everything is seeded and runs on CPU. One torch thread is the default: on a shared 2-core machine
two threads were measured 16x *slower* (OpenMP threads spin against other processes).
"""

from __future__ import annotations

import argparse
import json
import platform
import random
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Sequence

import torch
import transformers
from PIL import Image
from tqdm.auto import tqdm
from transformers import (
    CLIPImageProcessor,
    CLIPVisionConfig,
    LlamaConfig,
    LlamaForCausalLM,
    LlavaConfig,
    LlavaForConditionalGeneration,
    LlavaProcessor,
    PreTrainedTokenizerFast,
)

from vlmsafe.io import atomic_path, write_json_atomic
from vlmsafe.testbed import data as D
from vlmsafe.testbed.readme import write_readme
from vlmsafe.tokenization import IMAGE_TOKEN, build_word_tokenizer


@dataclass
class BuildConfig:
    """Sizes and schedules of the testbed build (defaults = the shipped testbed)."""

    seed: int = 0
    # language model
    hidden_size: int = 96
    intermediate_size: int = 256
    num_layers: int = 4
    num_heads: int = 4
    # vision tower
    image_size: int = D.IMAGE_SIZE
    patch_size: int = 8
    vision_hidden: int = 64
    vision_layers: int = 2
    # schedules: (steps, learning rate, batch size)
    pretrain: tuple[int, float, int] = (600, 3e-3, 64)
    align: tuple[int, float, int] = (400, 1e-3, 64)
    vl_pretrain: tuple[int, float, int] = (800, 5e-3, 64)
    vl_finetune: tuple[int, float, int] = (800, 1e-3, 64)
    #: share of image + benign-instruction examples in stage c2 (LLaVA-Instruct has such turns).
    c2_instruction_share: float = 0.35
    #: share of c2 images that also get one unanswerable question (see data.UNANSWERABLE_ANSWER).
    c2_unanswerable_share: float = 0.15
    #: share of text-only replay of the stage-b data in c2 (LLaVA-1.5 mixes in text-only chats).
    c2_text_share: float = 0.2
    #: learning-rate multiplier of the language model in c2 (the projector gets the full rate).
    c2_lm_lr_scale: float = 1.0
    n_train_images: int = 3000
    split_fractions: tuple[float, float] = (0.15, 0.3)
    threads: int = 1
    extra: dict = field(default_factory=dict)

    @property
    def num_image_tokens(self) -> int:
        return (self.image_size // self.patch_size) ** 2


# ---------------------------------------------------------------------------------------------
# Model and processor
# ---------------------------------------------------------------------------------------------


def build_processor(cfg: BuildConfig) -> LlavaProcessor:
    """Word-level tokenizer (llava-1.5 chat template) + CLIP image processor, sized to the testbed."""
    tok = build_word_tokenizer(sorted(D.vocabulary()))
    image_processor = CLIPImageProcessor(
        size={"shortest_edge": cfg.image_size},
        crop_size={"height": cfg.image_size, "width": cfg.image_size},
    )
    return LlavaProcessor(
        image_processor=image_processor,
        tokenizer=tok,
        patch_size=cfg.patch_size,
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,
        chat_template=tok.chat_template,
    )


def build_model(cfg: BuildConfig, tok: PreTrainedTokenizerFast) -> LlavaForConditionalGeneration:
    """A real ``LlavaForConditionalGeneration`` with a tiny Llama and a tiny CLIP vision tower."""
    text = LlamaConfig(
        vocab_size=len(tok),
        hidden_size=cfg.hidden_size,
        intermediate_size=cfg.intermediate_size,
        num_hidden_layers=cfg.num_layers,
        num_attention_heads=cfg.num_heads,
        num_key_value_heads=cfg.num_heads,
        max_position_embeddings=128,
        pad_token_id=tok.pad_token_id,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        tie_word_embeddings=False,
    )
    vision = CLIPVisionConfig(
        image_size=cfg.image_size,
        patch_size=cfg.patch_size,
        hidden_size=cfg.vision_hidden,
        intermediate_size=cfg.vision_hidden * 2,
        num_hidden_layers=cfg.vision_layers,
        num_attention_heads=4,
        projection_dim=cfg.vision_hidden,
    )
    config = LlavaConfig(
        text_config=text,
        vision_config=vision,
        image_token_index=tok.convert_tokens_to_ids(IMAGE_TOKEN),
        image_seq_length=cfg.num_image_tokens,
        vision_feature_layer=-1,
        vision_feature_select_strategy="default",
        projector_hidden_act="gelu",
        tie_word_embeddings=False,
    )
    torch.manual_seed(cfg.seed)
    model = LlavaForConditionalGeneration(config)
    model.generation_config.pad_token_id = tok.pad_token_id
    model.generation_config.eos_token_id = tok.eos_token_id
    model.generation_config.bos_token_id = tok.bos_token_id
    return model


def extract_language_model(model: LlavaForConditionalGeneration) -> LlamaForCausalLM:
    """The VLM's language model as a standalone ``LlamaForCausalLM`` (weights copied)."""
    lm = LlamaForCausalLM(model.config.text_config)
    lm.model.load_state_dict(model.model.language_model.state_dict())
    lm.lm_head.load_state_dict(model.lm_head.state_dict())
    lm.generation_config = model.generation_config
    return lm


# ---------------------------------------------------------------------------------------------
# Examples and batching
# ---------------------------------------------------------------------------------------------


@dataclass
class Example:
    prompt: str
    answer: str
    image: Image.Image | None = None


def prompt_text(processor: LlavaProcessor, prompt: str, with_image: bool) -> str:
    """The chat-formatted prompt (generation prompt added); text-only = same turn without image."""
    content = ([{"type": "image"}] if with_image else []) + [{"type": "text", "text": prompt}]
    return processor.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True)


class Encoder:
    """Tokenises examples once (image tokens expanded exactly like ``LlavaProcessor``)."""

    def __init__(self, processor: LlavaProcessor, num_image_tokens: int):
        self.processor = processor
        self.tok = processor.tokenizer
        self.n_img = num_image_tokens

    def encode(self, examples: Sequence[Example]) -> list[dict]:
        out = []
        images = [ex.image for ex in examples if ex.image is not None]
        pix = self.processor.image_processor(images, return_tensors="pt")["pixel_values"] if images else None
        k = 0
        for ex in examples:
            text = prompt_text(self.processor, ex.prompt, ex.image is not None)
            text = text.replace(IMAGE_TOKEN, IMAGE_TOKEN * self.n_img)
            p_ids = self.tok(text, add_special_tokens=False)["input_ids"]
            a_ids = self.tok(" " + ex.answer, add_special_tokens=False)["input_ids"] + [self.tok.eos_token_id]
            item = {"prompt": p_ids, "answer": a_ids, "pixel_values": None}
            if ex.image is not None:
                item["pixel_values"] = pix[k]
                k += 1
            out.append(item)
        return out


def collate(items: Sequence[dict], pad_id: int) -> dict[str, torch.Tensor]:
    """Left-padded batch with loss on answer tokens only; positions count from the first real token."""
    seqs = [it["prompt"] + it["answer"] for it in items]
    n = max(len(s) for s in seqs)
    ids = torch.full((len(items), n), pad_id, dtype=torch.long)
    mask = torch.zeros((len(items), n), dtype=torch.long)
    labels = torch.full((len(items), n), -100, dtype=torch.long)
    for i, (it, s) in enumerate(zip(items, seqs)):
        ids[i, n - len(s) :] = torch.tensor(s)
        mask[i, n - len(s) :] = 1
        labels[i, n - len(it["answer"]) :] = torch.tensor(it["answer"])
    batch = {"input_ids": ids, "attention_mask": mask, "labels": labels}
    batch["position_ids"] = (mask.cumsum(-1) - 1).clamp(min=0)
    pix = [it["pixel_values"] for it in items if it["pixel_values"] is not None]
    if pix:
        batch["pixel_values"] = torch.stack(pix)
    return batch


def train(
    model: torch.nn.Module,
    params: Sequence[torch.nn.Parameter] | Sequence[dict],
    pools: Sequence[tuple[list[dict], float]],
    schedule: tuple[int, float, int],
    pad_id: int,
    rng: random.Random,
    desc: str,
) -> float:
    """AdamW with linear warm-up/decay; each batch is homogeneous (all image or all text) and drawn
    from ``pools`` (items, weight). Returns the mean loss of the last 50 steps."""
    steps, lr, bs = schedule
    groups = list(params)
    if groups and not isinstance(groups[0], dict):
        groups = [{"params": groups}]
    groups = [{"params": g["params"], "lr": lr * g.get("lr_scale", 1.0)} for g in groups]
    flat = [p for g in groups for p in g["params"]]
    opt = torch.optim.AdamW(groups, lr=lr, weight_decay=0.01, betas=(0.9, 0.98))
    warm = max(1, steps // 20)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min((s + 1) / warm, max(0.0, (steps - s) / (steps - warm))))
    weights = [w for _, w in pools]
    model.train()
    losses: list[float] = []
    bar = tqdm(range(steps), desc=desc, leave=False, mininterval=2.0)
    for _ in bar:
        items, _w = rng.choices(pools, weights=weights)[0]
        batch = collate(rng.sample(items, min(bs, len(items))) if len(items) >= bs else rng.choices(items, k=bs), pad_id)
        loss = model(**batch).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(flat, 1.0)
        opt.step()
        sched.step()
        losses.append(loss.item())
        if len(losses) % 50 == 0:
            bar.set_postfix(loss=f"{sum(losses[-50:]) / 50:.3f}")
    model.eval()
    tail = losses[-50:]
    return sum(tail) / len(tail)


# ---------------------------------------------------------------------------------------------
# Data sets of each stage
# ---------------------------------------------------------------------------------------------


def text_examples(topics: Sequence[D.Topic], templates: Sequence[str], aligned: bool) -> list[Example]:
    out = []
    for t in topics:
        for tpl in templates:
            answer = D.REFUSAL if (aligned and t.harmful) else D.answer_for(t)
            out.append(Example(tpl.format(t=t.text), answer))
    return out


def image_pool(rng: random.Random, n: int) -> list[D.ImageQA]:
    return [D.make_image(rng) for _ in range(n)]


def caption_examples(images: Sequence[D.ImageQA]) -> list[Example]:
    out = []
    for im in images:
        q, a, _ = im.questions()[-1]  # "describe the image ."
        out.append(Example(q, a, im.image))
    return out


def vqa_examples(images: Sequence[D.ImageQA], rng: random.Random | None = None, unanswerable_share: float = 0.0) -> list[Example]:
    """Image questions (answerable only from the image), plus for a share of the images one
    question the image cannot answer ("sorry , i cannot tell that from the image .")."""
    out = [Example(q, a, im.image) for im in images for q, a, _ in im.questions()]
    if rng is not None and unanswerable_share > 0:
        for im in images:
            if rng.random() < unanswerable_share:
                q, a = im.unanswerable(rng)
                out.append(Example(q, a, im.image))
    return out


def image_instruction_examples(
    rng: random.Random, topics: Sequence[D.Topic], images: Sequence[D.ImageQA], n: int
) -> list[Example]:
    """Image + general benign instruction -> helpful answer (benign topics only)."""
    benign = [t for t in topics if not t.harmful]
    return [
        Example(rng.choice(D.TRAIN_TEMPLATES).format(t=(t := rng.choice(benign)).text), D.answer_for(t), rng.choice(images).image)
        for _ in range(n)
    ]


# ---------------------------------------------------------------------------------------------
# Held-out splits (shipped as JSONL + PNG)
# ---------------------------------------------------------------------------------------------


def make_split_items(split: str, topics: Sequence[D.Topic], rng: random.Random, n_vqa_images: int) -> list[tuple[dict, Image.Image]]:
    """Items of a shipped split: harmful instructions (with an image), benign instructions (with
    an image, for over-refusal) and benign image questions (with reference answers)."""
    items: list[tuple[dict, Image.Image]] = []
    if split == "test":
        templates_for = lambda: [*D.TEST_TEMPLATES, *rng.sample(D.TRAIN_TEMPLATES, 2)]  # noqa: E731
    else:
        templates_for = lambda: list(D.TRAIN_TEMPLATES)  # noqa: E731
    for t in topics:
        tpls = templates_for() if t.harmful else rng.sample(D.TRAIN_TEMPLATES if split != "test" else D.TEST_TEMPLATES, 2)
        for tpl in tpls:
            im = D.make_image(rng)
            items.append(
                (
                    {
                        "prompt": tpl.format(t=t.text),
                        "category": t.category if t.harmful else "benign_instruction",
                        "label": "harmful" if t.harmful else "benign",
                        "reference": None,
                    },
                    im.image,
                )
            )
    for _ in range(n_vqa_images):
        im = D.make_image(rng)
        q, _a, ref = rng.choice(im.questions())
        items.append(({"prompt": q, "category": f"vqa_{im.kind}", "label": "benign", "reference": ref}, im.image))
    return items


def write_split(out_dir: Path, split: str, items: Sequence[tuple[dict, Image.Image]]) -> None:
    img_dir = out_dir / "images" / split
    img_dir.mkdir(parents=True, exist_ok=True)
    lines = []
    for i, (rec, img) in enumerate(items):
        rid = f"{split}-{i:04d}"
        rel = f"images/{split}/{rid}.png"
        img.save(out_dir / rel, optimize=True)
        lines.append(json.dumps({"id": rid, "prompt": rec["prompt"], "image": rel, **{k: rec[k] for k in ("category", "label", "reference")}}))
    (out_dir / f"{split}.jsonl").write_text("\n".join(lines) + "\n")


# ---------------------------------------------------------------------------------------------
# The build
# ---------------------------------------------------------------------------------------------


def build_testbed(out: str | Path, cfg: BuildConfig | None = None, measure: bool = True) -> dict:
    """Build the testbed into ``out`` (atomically) and return the build info written there."""
    cfg = cfg or BuildConfig()
    torch.set_num_threads(cfg.threads)
    t0 = time.time()
    rng = random.Random(cfg.seed)
    torch.manual_seed(cfg.seed)
    splits = D.split_topics(cfg.seed, cfg.split_fractions)
    processor = build_processor(cfg)
    tok = processor.tokenizer
    model = build_model(cfg, tok)
    enc = Encoder(processor, cfg.num_image_tokens)
    pad = tok.pad_token_id
    lm = model.model.language_model
    timings: dict[str, float] = {}
    losses: dict[str, float] = {}

    def causal_lm_view() -> torch.nn.Module:
        # Stages a/b train the LM alone; LlavaForConditionalGeneration accepts text-only batches.
        return model

    lm_params = list(lm.parameters()) + list(model.lm_head.parameters())
    vision_params = list(model.model.vision_tower.parameters())
    proj_params = list(model.model.multi_modal_projector.parameters())

    # (a) pretraining
    t = time.time()
    pre = enc.encode(text_examples(splits["train"], D.TRAIN_TEMPLATES, aligned=False))
    losses["a_pretrain"] = train(causal_lm_view(), lm_params, [(pre, 1.0)], cfg.pretrain, pad, rng, "a: pretrain")
    timings["a_pretrain"] = time.time() - t

    # (b) safety alignment (text only)
    t = time.time()
    ali = enc.encode(text_examples(splits["train"], D.TRAIN_TEMPLATES, aligned=True))
    losses["b_align"] = train(causal_lm_view(), lm_params, [(ali, 1.0)], cfg.align, pad, rng, "b: align")
    timings["b_align"] = time.time() - t
    aligned_lm = extract_language_model(model)

    # (c1) VL pretraining: captions, LM frozen
    t = time.time()
    img_rng = random.Random(cfg.seed + 1)
    train_images = image_pool(img_rng, cfg.n_train_images)
    for p in lm_params:
        p.requires_grad_(False)
    caps = enc.encode(caption_examples(train_images))
    losses["c1_vl_pretrain"] = train(model, vision_params + proj_params, [(caps, 1.0)], cfg.vl_pretrain, pad, rng, "c1: vl-pretrain")
    timings["c1_vl_pretrain"] = time.time() - t

    # (c2) visual instruction tuning: projector + LM, benign image data only
    t = time.time()
    for p in lm_params:
        p.requires_grad_(True)
    for p in vision_params:
        p.requires_grad_(False)
    vqa = enc.encode(vqa_examples(train_images, random.Random(cfg.seed + 3), cfg.c2_unanswerable_share))
    pools = [(vqa, 1.0 - cfg.c2_instruction_share - cfg.c2_text_share)]
    if cfg.c2_instruction_share > 0:
        inst = enc.encode(image_instruction_examples(img_rng, splits["train"], train_images, 2000))
        pools.append((inst, cfg.c2_instruction_share))
    if cfg.c2_text_share > 0:
        pools.append((ali, cfg.c2_text_share))
    c2_params = [{"params": proj_params}, {"params": lm_params, "lr_scale": cfg.c2_lm_lr_scale}]
    losses["c2_vl_finetune"] = train(model, c2_params, pools, cfg.vl_finetune, pad, rng, "c2: vl-finetune")
    timings["c2_vl_finetune"] = time.time() - t
    for p in model.parameters():
        p.requires_grad_(True)

    out = Path(out)
    with atomic_path(out, overwrite=True) as tmp:
        tmp.mkdir(parents=True)
        model.save_pretrained(tmp)
        processor.save_pretrained(tmp)
        aligned_lm.save_pretrained(tmp / "aligned_lm")
        tok.save_pretrained(tmp / "aligned_lm")
        split_rng = random.Random(cfg.seed + 2)
        data_dir = tmp / "data"
        write_split(data_dir, "calibration", make_split_items("calibration", splits["calibration"], split_rng, 40))
        write_split(data_dir, "test", make_split_items("test", splits["test"], split_rng, 100))
        (data_dir / "topics.json").write_text(
            json.dumps({k: [[t.text, t.category] for t in v] for k, v in splits.items()}, indent=1) + "\n"
        )
        timings["total_build"] = time.time() - t0
        info = {
            "build_command": f"python -m vlmsafe.testbed.build --out {out} --seed {cfg.seed}",
            "seed": cfg.seed,
            "config": asdict(cfg),
            "versions": {
                "python": platform.python_version(),
                "torch": torch.__version__,
                "transformers": transformers.__version__,
            },
            "params": {
                "total": sum(p.numel() for p in model.parameters()),
                "language_model": sum(p.numel() for p in lm_params),
                "vision_tower": sum(p.numel() for p in vision_params),
                "projector": sum(p.numel() for p in proj_params),
            },
            "final_losses": losses,
            "timings_s": {k: round(v, 1) for k, v in timings.items()},
        }
        write_json_atomic(tmp / "build_info.json", info)
    if measure:
        from vlmsafe.testbed.check import measure_testbed

        info["measured"] = measure_testbed(out)
    info["sizes_bytes"] = {
        p.relative_to(out).as_posix(): p.stat().st_size for p in sorted(out.rglob("*")) if p.is_file() and "images" not in p.parts
    }
    info["sizes_bytes"]["data/images (all)"] = sum(p.stat().st_size for p in (out / "data" / "images").rglob("*.png"))
    info["total_size_bytes"] = sum(p.stat().st_size for p in out.rglob("*") if p.is_file())
    write_json_atomic(out / "build_info.json", info, overwrite=True)
    write_readme(out, info)
    return info


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m vlmsafe.testbed.build", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="assets/testbed", help="output folder (replaced atomically)")
    ap.add_argument("--seed", type=int, default=0, help="seed of data, splits and training")
    ap.add_argument("--no-measure", action="store_true", help="skip the safety/CMRM measurement after the build")
    args = ap.parse_args(argv)
    info = build_testbed(args.out, BuildConfig(seed=args.seed), measure=not args.no_measure)
    print(json.dumps({k: info[k] for k in ("timings_s", "final_losses", "total_size_bytes")}, indent=1))
    if "measured" in info:
        print(json.dumps(info["measured"].get("summary", {}), indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
