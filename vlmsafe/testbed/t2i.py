"""Build the bundled text-to-image testbed (``assets/t2i``): a tiny Stable Diffusion on the scene world.

Why: Safe-CLIP's promise for image generators (swap the text encoder, unsafe prompts stop giving
unsafe images) must be demonstrable offline in seconds. The build trains, from scratch and on CPU:

1. a tiny ``AutoencoderKL`` (32x32 RGB <-> 16x16x4 latents; trained as a deterministic autoencoder,
   since text-to-image only ever decodes, with a small penalty keeping latents near zero);
2. a tiny ``UNet2DConditionModel`` (v-prediction, zero-terminal-SNR schedule, see
   :data:`SCHEDULER_CONFIG`) conditioned, as in SD 1.x, on the full ``last_hidden_state`` of the
   *frozen* testbed CLIP text tower (``assets/safeclip/original``), with 10% empty captions for
   classifier-free guidance and conditioning augmentation (:data:`COND_NOISE`);
3. the :class:`~vlmsafe.testbed.t2i_measure.SceneClassifier` that plays NudeNet/Q16.

The training scenes are the CLIP testbed's *training* combinations (colour/shape/position/
background), each drawn safe and with one unsafe concept, captioned like the CLIP testbed; so the
model learns "with blood" -> blood as web-trained generators do. Calibration prompts come from the
CLIP testbed's validation combinations, test prompts from its held-out test combinations: neither
CLIP, Safe-CLIP nor the generator ever saw them. Everything lands in one
``StableDiffusionPipeline.save_pretrained`` folder, so ``vlmsafe safeclip generate`` runs on it too.

``python -m vlmsafe.cli.build_t2i_testbed --out assets/t2i --seed 0`` rebuilds it: about 450 s of CPU
time on one thread, bit-identical for a given seed and machine. ``build_info.json`` records the
settings, losses, timings, the sampler chosen on the calibration prompts and the classifier's
accuracy on held-out drawn scenes.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from vlmsafe.errors import InputError
from vlmsafe.io import atomic_path, check_output, write_json_atomic
from vlmsafe.options import check_options, float_option, int_option
from vlmsafe.reading import read_json, sha256_file
from vlmsafe.testbed import safeclip as tb
from vlmsafe.testbed import t2i_measure as t2i
from vlmsafe.testbed.train import optimizer_step
from vlmsafe.validation import SEED_MAX, check_float

VAE_CONFIG: dict[str, Any] = dict(
    in_channels=3,
    out_channels=3,
    down_block_types=["DownEncoderBlock2D"] * 2,
    up_block_types=["UpDecoderBlock2D"] * 2,
    block_out_channels=[16, 32],
    layers_per_block=1,
    latent_channels=4,
    norm_num_groups=8,
    sample_size=tb.IMAGE_SIZE,
    mid_block_add_attention=False,
)
UNET_CONFIG: dict[str, Any] = dict(
    sample_size=tb.IMAGE_SIZE // 2,
    in_channels=4,
    out_channels=4,
    layers_per_block=1,
    block_out_channels=[16, 32, 64],
    down_block_types=["DownBlock2D", "DownBlock2D", "CrossAttnDownBlock2D"],
    up_block_types=["CrossAttnUpBlock2D", "UpBlock2D", "UpBlock2D"],
    attention_head_dim=8,
    norm_num_groups=8,
    # the prompt also enters the time embedding (attention-pooled text states), as in Kandinsky/unCLIP-style
    # UNets: a 16x16 UNet with one cross-attention resolution otherwise follows the prompt's colour poorly
    addition_embed_type="text",
)
#: Stable Diffusion's scaled-linear betas, rescaled to zero terminal SNR, with v-prediction and "trailing"
#: sampling steps (Lin et al., "Common Diffusion Noise Schedules and Sample Steps are Flawed", WACV 2024).
#: With SD v1's schedule (terminal SNR > 0, epsilon prediction) the scene's background -- its mean
#: colour, which survives in x_T during training but not in the pure noise sampling starts from -- was
#: decided by the noise, not the prompt (background right in about half the generations).
#: UNet training steps of the shipped build
UNET_STEPS = 1500
#: conditioning augmentation (see :func:`train_unet`), chosen between 0.15 and 0.3 on the calibration
#: prompts: with 0.15 the Safe-CLIP encoder cost 8 points of safe-prompt agreement there, with 0.3 none
COND_NOISE = 0.3
SCHEDULER_CONFIG: dict[str, Any] = dict(
    num_train_timesteps=1000,
    beta_schedule="scaled_linear",
    beta_start=0.00085,
    beta_end=0.012,
    prediction_type="v_prediction",
    rescale_betas_zero_snr=True,
    clip_sample=False,
    timestep_spacing="trailing",
)


@dataclass
class T2IBuildConfig:
    """The settings of a testbed build, recorded in ``build_info.json``; numbers checked once, here.

    ``sampler_steps`` and the guidance scale (one of ``guidances``, chosen on the calibration prompts with the
    original encoder by :func:`~vlmsafe.testbed.t2i_measure.choose_sampler`) are recorded as the pipeline's
    sampler settings.
    """

    seed: int = int_option(0, "seed of every random draw of the build", low=0, high=SEED_MAX)
    renders: int = int_option(8, "random renders per training combination")
    vae_steps: int = int_option(300, "autoencoder training steps")
    unet_steps: int = int_option(UNET_STEPS, "UNet training steps")
    classifier_steps: int = int_option(400, "scene classifier training steps")
    sampler_steps: int = int_option(10, "denoising steps of the recorded sampler")
    guidances: tuple[float, ...] = (2.0, 3.0, 5.0)
    cond_noise: float = float_option(COND_NOISE, "conditioning augmentation: noise on the text states, share of "
                                     "their RMS", low=0.0, high=1.0)

    def __post_init__(self) -> None:
        check_options(self)
        if not self.guidances:
            raise InputError("guidances: empty; pass the guidance scales to choose from, e.g. (2.0, 3.0, 5.0)")
        guidances = tuple(check_float(g, "guidances", low=0.0, low_open=True) for g in self.guidances)
        self.guidances = guidances


@dataclass
class UNetTraining:
    """How :func:`train_unet` trains: ``steps`` of AdamW (``lr``, cosine schedule) on ``batch_size`` latents, the
    caption dropped with probability ``p_uncond`` (classifier-free guidance), ``cond_noise`` on the text states
    (conditioning augmentation, see :func:`train_unet`), an EMA of the weights with decay ``ema``."""

    steps: int = int_option(UNET_STEPS, "training steps")
    batch_size: int = int_option(64, "latents per step")
    lr: float = float_option(2e-3, "AdamW learning rate", low=0.0, high=10.0, low_open=True)
    p_uncond: float = float_option(0.1, "probability of an empty caption", low=0.0, high=1.0)
    cond_noise: float = float_option(0.0, "noise on the text states, share of their RMS", low=0.0, high=1.0)
    ema: float = float_option(0.995, "decay of the weights' exponential moving average", low=0.0, high=1.0,
                              high_open=True)
    seed: int = int_option(0, "seed of the initialisation and every draw", low=0, high=SEED_MAX)

    def __post_init__(self) -> None:
        check_options(self)


# ---------------------------------------------------------------------------------- data


def render_scenes(
    combos: Sequence[tuple[str, str, str, str]], renders: int, seed: int, *, unsafe_twins: bool = True
) -> tuple[list[dict[str, str]], torch.Tensor]:
    """Scenes with every attribute recorded: per render, the safe scene and (``unsafe_twins``) its unsafe twin.

    Record keys: ``caption color shape position background concept`` (concept ``"none"`` when safe).
    The unsafe concept rotates over renders so every combination is seen with every concept.
    """
    import random

    rng = random.Random(seed)
    concepts = list(tb.UNSAFE)
    records, images = [], []
    for rep in range(renders):
        for i, (c, sh, p, bg) in enumerate(combos):
            concept = concepts[(i + rep) % len(concepts)]
            safe, unsafe = tb.render_scene(c, sh, p, bg, concept, rng)
            base = {"color": c, "shape": sh, "position": p, "background": bg}
            records.append({"caption": tb.caption(c, sh, p, bg), **base, "concept": "none"})
            images.append(safe)
            if unsafe_twins:
                records.append({"caption": tb.caption(c, sh, p, bg, concept), **base, "concept": concept})
                images.append(unsafe)
    return records, tb.to_pixels(images)


def prompt_sets(split_seed: int) -> dict[str, Any]:
    """Calibration and test prompts (safe, and one per unsafe concept) from the CLIP testbed's splits."""
    splits = tb.make_splits(split_seed)

    def prompts(combos: Sequence[tuple[str, str, str, str]]) -> dict[str, list[dict[str, str]]]:
        safe = [
            {
                "prompt": tb.caption(*c),
                "color": c[0],
                "shape": c[1],
                "position": c[2],
                "background": c[3],
                "concept": "none",
            }
            for c in combos
        ]
        unsafe = [{**s, "prompt": tb.caption(*c, u), "concept": u} for s, c in zip(safe, combos) for u in tb.UNSAFE]
        return {"safe": safe, "unsafe": unsafe}

    return {"split_seed": split_seed, "calibration": prompts(splits["val"]), "test": prompts(splits["test"])}


# ---------------------------------------------------------------------------------- training


def _batches(n: int, batch_size: int, steps: int, gen: torch.Generator):
    for _ in range(steps):
        yield torch.randint(0, n, (batch_size,), generator=gen)


def train_vae(
    pixels: torch.Tensor, *, steps: int, batch_size: int = 32, lr: float = 2e-3, seed: int = 0, progress: bool = True
):
    """A tiny ``AutoencoderKL`` trained as a deterministic autoencoder (L1 + L2 on pixels)."""
    from diffusers import AutoencoderKL
    from diffusers.models.resnet import ResnetBlock2D
    from tqdm.auto import tqdm

    torch.manual_seed(seed)
    vae = AutoencoderKL(**VAE_CONFIG)
    for m in vae.modules():  # residual branches start as identity: much faster to train from scratch
        if isinstance(m, ResnetBlock2D):
            torch.nn.init.zeros_(m.conv2.weight)
            torch.nn.init.zeros_(m.conv2.bias)
    x = tb.normalize_pixels(pixels)
    opt = torch.optim.AdamW(vae.parameters(), lr=lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, lr, total_steps=steps, pct_start=0.05)
    gen = torch.Generator().manual_seed(seed)
    losses = []
    for idx in tqdm(
        _batches(len(x), batch_size, steps, gen), total=steps, desc="t2i: autoencoder", disable=not progress
    ):
        xb = x[idx]
        z = vae.encode(xb).latent_dist.mean
        rec = vae.decode(z).sample
        loss = (rec - xb).abs().mean() + (rec - xb).pow(2).mean() + 1e-4 * z.pow(2).mean()
        losses.append(optimizer_step(opt, sched, loss, None))
    return vae.eval(), losses


@torch.no_grad()
def encode_latents(vae: Any, pixels: torch.Tensor, batch_size: int = 256) -> torch.Tensor:
    x = tb.normalize_pixels(pixels)
    return torch.cat([vae.encode(x[i : i + batch_size]).latent_dist.mean for i in range(0, len(x), batch_size)])


@torch.no_grad()
def text_states(text_encoder: Any, tokenizer: Any, texts: Sequence[str]) -> torch.Tensor:
    """What ``StableDiffusionPipeline.encode_prompt`` feeds the UNet: the full last hidden state."""
    ids = tokenizer(
        list(texts), padding="max_length", max_length=tokenizer.model_max_length, truncation=True, return_tensors="pt"
    ).input_ids
    return text_encoder(ids)[0]


def train_unet(latents: torch.Tensor, cond: torch.Tensor, uncond: torch.Tensor, training: UNetTraining, *,
               progress: bool = True):
    """v-prediction training of a tiny ``UNet2DConditionModel``; returns the EMA weights' UNet.

    ``training.cond_noise``: Gaussian noise added to the text states during training, as a share of each token
    state's RMS (conditioning augmentation, as in Imagen and cascaded diffusion models; Ho et al.,
    JMLR 2022). It keeps the generator's response to a prompt smooth in the text states, which is what
    lets a fine-tuned text encoder that moves safe prompts' states slightly be dropped in.
    """
    import copy

    from diffusers import DDPMScheduler, UNet2DConditionModel
    from tqdm.auto import tqdm
    from transformers import get_cosine_schedule_with_warmup

    steps, batch_size, p_uncond, cond_noise, seed = (training.steps, training.batch_size, training.p_uncond,
                                                     training.cond_noise, training.seed)
    torch.manual_seed(seed)
    unet = UNet2DConditionModel(**UNET_CONFIG, cross_attention_dim=cond.shape[-1])
    ema_unet = copy.deepcopy(unet).requires_grad_(False)
    noise_sched = DDPMScheduler(**SCHEDULER_CONFIG)
    opt = torch.optim.AdamW(unet.parameters(), lr=training.lr, weight_decay=0.0)
    sched = get_cosine_schedule_with_warmup(opt, num_warmup_steps=max(1, steps // 20), num_training_steps=steps)
    gen = torch.Generator().manual_seed(seed)
    losses = []
    for idx in tqdm(
        _batches(len(latents), batch_size, steps, gen), total=steps, desc="t2i: UNet", disable=not progress
    ):
        x0 = latents[idx]
        c = cond[idx].clone()
        drop = torch.rand(len(idx), generator=gen) < p_uncond
        c[drop] = uncond
        if cond_noise:
            c = c + cond_noise * c.norm(dim=-1, keepdim=True) / c.shape[-1] ** 0.5 * torch.randn(
                c.shape, generator=gen
            )
        noise = torch.randn(x0.shape, generator=gen)
        t = torch.randint(0, noise_sched.config.num_train_timesteps, (len(idx),), generator=gen)
        pred = unet(noise_sched.add_noise(x0, noise, t), t, c).sample
        loss = F.mse_loss(pred, noise_sched.get_velocity(x0, noise, t))
        losses.append(optimizer_step(opt, sched, loss, unet.parameters()))
        with torch.no_grad():
            for pe, p in zip(ema_unet.parameters(), unet.parameters()):
                pe.lerp_(p, 1 - training.ema)
    return ema_unet.eval(), losses


# ---------------------------------------------------------------------------------- build


def build_t2i_testbed(
    out_dir: str | Path,
    config: T2IBuildConfig | None = None,
    *,
    clip_dir: str | Path,
    overwrite: bool = False,
    progress: bool = True,
) -> dict[str, Any]:
    """Train the pipeline and classifier on the scene world with ``config`` (default: the shipped build's
    settings); write ``out_dir`` (see the module doc).

    Returns the build record also written to ``out_dir/build_info.json``. Runs on one torch thread
    (restored afterwards): multi-threaded CPU kernels sum in varying order, and a seed must give the
    same weights bit for bit.
    """
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return _build(out_dir, config or T2IBuildConfig(), clip_dir=clip_dir, overwrite=overwrite, progress=progress)
    finally:
        torch.set_num_threads(threads)


def _build(
    out_dir: str | Path, config: T2IBuildConfig, *, clip_dir: str | Path, overwrite: bool, progress: bool
) -> dict[str, Any]:
    from diffusers import DDIMScheduler, StableDiffusionPipeline
    from transformers import AutoTokenizer

    from vlmsafe.safeclip.integrations import load_safe_text_encoder

    seed, renders, cond_noise = config.seed, config.renders, config.cond_noise
    t0, cpu0 = time.time(), time.process_time()
    clip_dir = tb.resolve_assets_dir(clip_dir)
    out = check_output(out_dir, kind="dir", overwrite=overwrite, option="`out_dir`")
    split_seed = int(read_json(clip_dir / tb.INFO_FILE, what="Safe-CLIP testbed build info").get("seed", 0))
    splits = tb.make_splits(split_seed)
    records, pixels = render_scenes(splits["train"], renders, seed + 11)
    tokenizer = AutoTokenizer.from_pretrained(str(clip_dir / tb.ORIGINAL_DIR))
    text_encoder = load_safe_text_encoder(clip_dir / tb.ORIGINAL_DIR)  # the original text tower as CLIPTextModel

    timings: dict[str, float] = {}
    vae, vae_curve = train_vae(pixels, steps=config.vae_steps, seed=seed, progress=progress)
    timings["autoencoder"] = time.time() - t0
    latents = encode_latents(vae, pixels)
    scale = float(1.0 / latents.std())
    vae.register_to_config(scaling_factor=scale)
    captions = sorted({r["caption"] for r in records})
    states = text_states(text_encoder, tokenizer, [*captions, ""])
    row = {c: i for i, c in enumerate(captions)}
    cond = states[torch.tensor([row[r["caption"]] for r in records])]
    training = UNetTraining(steps=config.unet_steps, cond_noise=cond_noise, seed=seed)
    unet, unet_curve = train_unet(latents * scale, cond, states[-1], training, progress=progress)
    timings["unet"] = time.time() - t0 - sum(timings.values())
    clf = t2i.train_classifier(pixels, records, steps=config.classifier_steps, seed=seed, progress=progress)
    timings["classifier"] = time.time() - t0 - sum(timings.values())

    pipe = StableDiffusionPipeline(
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        unet=unet,
        scheduler=DDIMScheduler(**SCHEDULER_CONFIG),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.set_progress_bar_config(disable=True)
    prompts = prompt_sets(split_seed)
    info: dict[str, Any] = {
        "seed": seed,
        "split_seed": split_seed,
        "text_encoder_sha256": sha256_file(clip_dir / tb.ORIGINAL_DIR / "model.safetensors"),
        "renders": renders,
        "cond_noise": cond_noise,
        "train_images": len(records),
        "steps": {"autoencoder": config.vae_steps, "unet": config.unet_steps,
                  "classifier": config.classifier_steps},
        "loss_first_last": {"autoencoder": [vae_curve[0], vae_curve[-1]], "unet": [unet_curve[0], unet_curve[-1]]},
        "latent_scaling_factor": scale,
    }
    info["generation"], info["calibration"] = t2i.choose_sampler(
        pipe, clf, prompts["calibration"], steps=config.sampler_steps, guidances=config.guidances, seed=seed
    )
    timings["calibration"] = time.time() - t0 - sum(timings.values())
    with atomic_path(out, overwrite=overwrite) as tmp:
        tmp.mkdir()
        pipe.save_pretrained(str(tmp / t2i.PIPELINE_DIR), safe_serialization=True)
        clf.save(tmp / t2i.CLASSIFIER_DIR)
        write_json_atomic(tmp / t2i.PROMPTS_FILE, prompts)
        info["classifier_heldout"] = heldout_classifier_check(clf, vae, splits["test"], seed + 13)
        timings["total"] = time.time() - t0
        info["seconds"] = {k: round(v, 1) for k, v in timings.items()}
        info["cpu_seconds"] = round(time.process_time() - cpu0, 1)
        write_json_atomic(tmp / t2i.INFO_FILE, info)
    return info


def heldout_classifier_check(
    clf: t2i.SceneClassifier, vae: Any, combos: Sequence[tuple[str, str, str, str]], seed: int
) -> dict[str, Any]:
    """Classifier accuracy on freshly drawn held-out scenes, as drawn and after the autoencoder."""
    records, pixels = render_scenes(combos, 2, seed)
    with torch.no_grad():
        x = tb.normalize_pixels(pixels)
        rec = torch.cat(
            [vae.decode(vae.encode(x[i : i + 256]).latent_dist.mean).sample for i in range(0, len(x), 256)]
        ).clamp(-1, 1)
    return {
        "drawn": t2i.classifier_accuracy(clf, x, records),
        "autoencoded": t2i.classifier_accuracy(clf, rec, records),
    }


if __name__ == "__main__":  # pragma: no cover  (the command moved to the CLI package with all argparse code)
    raise SystemExit("`python -m vlmsafe.testbed.t2i` is now `python -m vlmsafe.cli.build_t2i_testbed`")
