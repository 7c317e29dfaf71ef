"""``vlmsafe safeclip train | eval | pairs`` — Safe-CLIP from the command line."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any, Optional

from vlmsafe.errors import FileFormatError, InputError

_TRAIN_EPILOG = """\
data formats:
  JSONL quadruplets   {"safe": "...", "unsafe": "...", "safe_image": "img/1.jpg", "unsafe_image": "img/1u.jpg"}
                      (images optional, relative to --image-root or the file's folder)
  ViSU-Text           records with "safe", "nsfw", "coco_id" (+ --coco-dir holding train2017/ val2017/)
  Items without images train the text terms only; data with no images at all trains the text
  tower only (text-only mode, e.g. ViSU-Text, whose unsafe images are not public).

examples:
  vlmsafe safeclip train --model openai/clip-vit-large-patch14 --data visu_train.json \\
      --coco-dir coco --val-data visu_val.json --output-dir runs/safeclip --epochs 2
  vlmsafe safeclip train ... --resume latest          # continue an interrupted run
  torchrun --nproc_per_node 2 -m vlmsafe.cli safeclip train ...   # several processes/GPUs

The fine-tuned model (best validation weights, LoRA merged) is written to OUTPUT_DIR/model:
an HF CLIPModel folder (or open_clip safetensors + JSON). Checkpoints (OUTPUT_DIR/checkpoint-*)
hold safetensors + JSON only; no pickle is ever loaded.
"""

_EVAL_EPILOG = """\
Without --safe/--data it evaluates the bundled testbed (assets/safeclip): a tiny CLIP trained on
synthetic scenes where blood, knives and fire play the unsafe concepts, before and after Safe-CLIP,
on held-out scenes. safe@1 = share of unsafe text queries whose top-1 image is a safe image.
--gallery original (default) embeds the gallery with the original model, i.e. each Safe-CLIP
tower is used as a drop-in replacement (as in diffusers / LLaVA); --gallery self uses both
Safe-CLIP towers.
"""


def register(subparsers: Any) -> None:
    p = subparsers.add_parser(
        "safeclip",
        help="Safe-CLIP: fine-tune CLIP so unsafe text/images embed like safe ones (train, eval, pairs)",
        description="Safe-CLIP (Poppi et al., ECCV 2024): fine-tune CLIP text/vision encoders so unsafe inputs are redirected to safe embeddings while safe ones are preserved.",
    )
    sub = p.add_subparsers(dest="safeclip_command", metavar="{train,eval,pairs}")
    p.set_defaults(func=lambda args: (p.print_help(), 1)[1])

    t = sub.add_parser("train", help="fine-tune a CLIP model with the Safe-CLIP losses", description="Fine-tune a CLIP model with the eight Safe-CLIP losses (LoRA by default).", epilog=_TRAIN_EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    t.add_argument("--model", required=True, help="HF CLIP folder or hub id, an open_clip checkpoint folder, or open_clip:NAME[@PRETRAINED]")
    t.add_argument("--data", required=True, help="training data: JSONL quadruplets or a ViSU-Text JSON/JSONL file")
    t.add_argument("--val-data", help="validation data (same formats); default: hold out --val-fraction of --data")
    t.add_argument("--val-fraction", type=float, default=0.05, help="share of --data held out for validation when --val-data is not given (0 disables validation)")
    t.add_argument("--image-root", help="folder that relative image paths in JSONL data are relative to")
    t.add_argument("--coco-dir", help="COCO folder (train2017/, val2017/) for ViSU data")
    t.add_argument("--output-dir", required=True, help="where checkpoints and the final model (OUTPUT_DIR/model) go")
    t.add_argument("--config", help="JSON or YAML file of SafeCLIPTrainingConfig fields; flags below override it")
    t.add_argument("--text-only", action="store_true", help="ignore images and train the text tower only")
    t.add_argument("--no-text", action="store_true", help="do not train the text tower (vision only)")
    t.add_argument("--full-finetune", action="store_true", help="train all tower weights instead of LoRA")
    t.add_argument("--lora-r", type=int, help="LoRA rank (default 16)")
    t.add_argument("--lora-alpha", type=float, help="LoRA alpha (default 1, the reference's; update scale = alpha / r)")
    t.add_argument("--lora-dropout", type=float, help="LoRA dropout (default 0.1)")
    t.add_argument("--lora-targets", help="comma-separated module names LoRA wraps (default HF: k_proj,v_proj,out_proj,fc1,fc2,patch_embedding)")
    t.add_argument("--reference", choices=("copy", "disable_adapter"), help="frozen reference: a separate copy (default) or LoRA disabled (saves memory)")
    t.add_argument("--lr", type=float, dest="learning_rate", help="AdamW learning rate (default 1e-3)")
    t.add_argument("--weight-decay", type=float, help="AdamW weight decay (default 0)")
    t.add_argument("--scheduler", dest="lr_scheduler", help="transformers scheduler name (constant_with_warmup, cosine, linear...)")
    t.add_argument("--warmup-steps", type=int, help="linear learning-rate warm-up steps (default 0)")
    t.add_argument("--batch-size", type=int, help="global batch per forward pass (split across processes)")
    t.add_argument("--grad-accum", type=int, dest="gradient_accumulation_steps", help="micro-batches per optimizer step (default 1)")
    t.add_argument("--epochs", type=int, dest="num_epochs", help="passes over the training data (default 1)")
    t.add_argument("--max-steps", type=int, help="stop after this many optimizer steps")
    t.add_argument("--max-grad-norm", type=float, help="gradient clipping norm (default 1.0; 0 disables)")
    t.add_argument("--mixed-precision", choices=("no", "fp16", "bf16"), help="autocast precision (bf16 also works on CPU)")
    t.add_argument("--eval-every", type=int, help="validate every N optimizer steps (default: every epoch)")
    t.add_argument("--patience", type=int, dest="early_stopping_patience", help="evaluations without improvement before stopping")
    t.add_argument("--best-metric", choices=("recall_sum", "loss"), help="which validation metric picks the saved weights (default recall_sum)")
    t.add_argument("--save-every", type=int, help="checkpoint every N optimizer steps (default: at the end)")
    t.add_argument("--weights", help="loss weights, e.g. 'G_Sref=0.5,text_nsfw=0.2' (others keep their defaults)")
    t.add_argument("--seed", type=int, help="seed for LoRA init and data order (default 0)")
    t.add_argument("--resume", help="checkpoint folder or 'latest' (in --output-dir) to continue from")
    t.add_argument("--no-progress", action="store_true", help="hide progress bars")
    t.set_defaults(func=_train)

    e = sub.add_parser("eval", help="retrieval Recall@K table, original vs Safe-CLIP (default: bundled testbed)", description="Print Recall@1/5/10/20 for S→V, U→V, U→(V∪G), V→S and G→S, original vs Safe-CLIP.", epilog=_EVAL_EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    e.add_argument("--original", help="the original CLIP (folder, hub id, open_clip:NAME)")
    e.add_argument("--safe", help="the Safe-CLIP model (OUTPUT_DIR/model of `safeclip train`)")
    e.add_argument("--data", help="evaluation quadruplets with images (JSONL or ViSU + --coco-dir)")
    e.add_argument("--image-root", help="folder that relative image paths in --data are relative to")
    e.add_argument("--coco-dir", help="COCO folder for ViSU-layout --data")
    e.add_argument("--assets", help="testbed folder (default: the bundled assets/safeclip)")
    e.add_argument("--gallery", choices=("original", "self"), default="original", help="which model embeds the retrieval gallery for the Safe-CLIP rows")
    e.add_argument("--batch-size", type=int, default=64, help="embedding batch size")
    e.add_argument("--json", help="also write the rows to this JSON file")
    e.set_defaults(func=_eval)

    pr = sub.add_parser("pairs", help="safe→unsafe caption converter: fine-tune a causal LM on pairs, generate unsafe captions", description="Build Safe-CLIP training text: fine-tune a causal LM on (safe, unsafe) caption pairs, then generate unsafe versions of safe captions.")
    psub = pr.add_subparsers(dest="pairs_command", metavar="{train,generate}")
    pr.set_defaults(func=lambda args: (pr.print_help(), 1)[1])
    pt = psub.add_parser("train", help="LoRA fine-tune a causal LM on (safe, unsafe) pairs", description="LoRA (or full) fine-tuning of a transformers causal LM on a small file of (safe, unsafe) caption pairs; the paper used ~100 curated pairs.")
    pt.add_argument("--model", required=True, help="transformers causal LM folder or hub id")
    pt.add_argument("--pairs", required=True, help="JSONL/JSON records with 'safe' and 'unsafe' (or 'nsfw'), or a CSV with those columns")
    pt.add_argument("--output-dir", required=True, help="where the adapter (safetensors) and tokenizer are saved")
    pt.add_argument("--full-finetune", action="store_true", help="train all weights instead of LoRA")
    pt.add_argument("--epochs", type=int, default=3)
    pt.add_argument("--lr", type=float, default=2e-4)
    pt.add_argument("--batch-size", type=int, default=8)
    pt.add_argument("--lora-r", type=int, default=16)
    pt.add_argument("--lora-alpha", type=float, default=32.0)
    pt.add_argument("--template", default=None, help="prompt template with {safe} (default 'Safe: {safe}\\nUnsafe:')")
    pt.set_defaults(func=_pairs_train)
    pg = psub.add_parser("generate", help="write unsafe versions of safe captions (JSONL ready for `safeclip train`)", description="Generate an unsafe version of each safe caption with a converter trained by `pairs train`.")
    pg.add_argument("--model", required=True, help="the base causal LM (folder or hub id)")
    pg.add_argument("--adapter", help="folder written by `pairs train` (omit for a fully fine-tuned --model)")
    pg.add_argument("--captions", required=True, help="a .txt file (one caption per line) or JSONL with 'safe' or 'caption' fields")
    pg.add_argument("--output", required=True, help="JSONL output: {\"safe\": ..., \"unsafe\": ...} per line")
    pg.add_argument("--batch-size", type=int, default=16)
    pg.add_argument("--max-new-tokens", type=int, default=64)
    pg.add_argument("--sample", action="store_true", help="sample (with --temperature/--top-p) instead of greedy decoding")
    pg.add_argument("--temperature", type=float, default=1.0)
    pg.add_argument("--top-p", type=float, default=0.9)
    pg.add_argument("--template", default=None)
    pg.set_defaults(func=_pairs_generate)


# ------------------------------------------------------------------------------------ train


def _load_config_file(path: str) -> dict[str, Any]:
    p = Path(path)
    if not p.is_file():
        raise FileFormatError(f"config file {p} does not exist")
    text = p.read_text()
    if p.suffix.lower() in (".yaml", ".yml"):
        import yaml

        data = yaml.safe_load(text)
    else:
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise FileFormatError(f"{p} is not valid JSON ({exc}); use .yaml/.yml for YAML") from exc
    if not isinstance(data, dict):
        raise FileFormatError(f"{p} must hold a mapping of SafeCLIPTrainingConfig fields")
    return data


def _parse_weights(text: str) -> dict[str, float]:
    out = {}
    for part in filter(None, (s.strip() for s in text.split(","))):
        key, eq, value = part.partition("=")
        if not eq:
            raise InputError(f"--weights expects NAME=VALUE pairs separated by commas, got {part!r}")
        try:
            out[key.strip()] = float(value)
        except ValueError as exc:
            raise InputError(f"--weights: {value!r} is not a number") from exc
    return out


def _train(args: argparse.Namespace) -> int:
    from vlmsafe.safeclip.backends import load_backend
    from vlmsafe.safeclip.data import Quadruplet, QuadrupletDataset, load_dataset
    from vlmsafe.safeclip.losses import SafeCLIPLossWeights
    from vlmsafe.safeclip.trainer import SafeCLIPTrainer, SafeCLIPTrainingConfig

    fields = _load_config_file(args.config) if args.config else {}
    for name in ("lora_r", "lora_alpha", "lora_dropout", "reference", "learning_rate", "weight_decay", "lr_scheduler", "warmup_steps", "batch_size", "gradient_accumulation_steps", "num_epochs", "max_steps", "max_grad_norm", "mixed_precision", "eval_every", "early_stopping_patience", "best_metric", "save_every", "seed"):
        if getattr(args, name, None) is not None:
            fields[name] = getattr(args, name)
    if args.lora_targets:
        fields["lora_target_modules"] = [s.strip() for s in args.lora_targets.split(",") if s.strip()]
    if args.full_finetune:
        fields["use_lora"] = False
    if args.text_only:
        fields["train_vision"] = False
    if args.no_text:
        fields["train_text"] = False
    if args.weights:
        base = dict(fields.get("weights") or {})
        base.update(_parse_weights(args.weights))
        fields["weights"] = SafeCLIPLossWeights.from_dict(base)
    if args.no_progress:
        fields["progress"] = False
    config = SafeCLIPTrainingConfig.from_dict(fields)

    data = load_dataset(args.data, image_root=args.image_root, coco_dir=args.coco_dir)
    if args.text_only:
        data = QuadrupletDataset(Quadruplet(q.safe, q.unsafe) for q in data)
    if args.val_data:
        val = load_dataset(args.val_data, image_root=args.image_root, coco_dir=args.coco_dir)
        if args.text_only:
            val = QuadrupletDataset(Quadruplet(q.safe, q.unsafe) for q in val)
    elif args.val_fraction and args.val_fraction > 0:
        data, val = data.split(args.val_fraction, seed=config.seed)
    else:
        val = None
    backend = load_backend(args.model)
    trainer = SafeCLIPTrainer(backend, config, data, val, output_dir=args.output_dir)
    if trainer.accelerator.is_main_process:
        mode = "LoRA" if config.use_lora else "full fine-tuning"
        print(f"Safe-CLIP: {len(data)} training items, {0 if val is None else len(val)} validation; towers {', '.join(trainer.towers)}; {mode}; {trainer.total_steps} steps", file=sys.stderr)
    result = trainer.train(resume_from=args.resume)
    out = trainer.save_pretrained(Path(args.output_dir) / "model", overwrite=bool(args.resume))
    if trainer.accelerator.is_main_process:
        summary = {"model_dir": str(out), "global_step": result.global_step, "stopped_early": result.stopped_early, "best_step": result.best_step, "best_metrics": result.best_metrics}
        print(json.dumps(summary, indent=2))
    return 0


# ------------------------------------------------------------------------------------ eval


def _eval(args: argparse.Namespace) -> int:
    from vlmsafe.safeclip.retrieval import format_table, retrieval_table

    if args.safe or args.data or args.original:
        if not (args.safe and args.data and args.original):
            raise InputError("evaluating your own model needs --original, --safe and --data together (or none of them for the bundled testbed)")
        from vlmsafe.safeclip.backends import load_backend
        from vlmsafe.safeclip.data import load_dataset

        data = load_dataset(args.data, image_root=args.image_root, coco_dir=args.coco_dir)
        rows = retrieval_table(load_backend(args.original), data, load_backend(args.safe), gallery=args.gallery, batch_size=args.batch_size, progress=True)
        title = f"Retrieval on {args.data} ({len(data)} items)"
    else:
        from vlmsafe.safeclip.testbed import default_assets_dir, heldout_rows, resolve_assets_dir

        d = resolve_assets_dir(args.assets or default_assets_dir())
        rows = heldout_rows(d, gallery=args.gallery)
        title = f"Safe-CLIP testbed ({d}): held-out scenes, tiny CLIP before/after Safe-CLIP"
    print(title)
    print(format_table(rows))
    if args.json:
        from vlmsafe.io import write_json_atomic

        write_json_atomic(args.json, rows)
    return 0


# ------------------------------------------------------------------------------------ pairs


def _load_lm(model: str, adapter: Optional[str] = None):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        tok = AutoTokenizer.from_pretrained(adapter or model) if adapter and (Path(adapter) / "tokenizer_config.json").is_file() else AutoTokenizer.from_pretrained(model)
        lm = AutoModelForCausalLM.from_pretrained(model)
    except OSError as exc:
        raise FileFormatError(f"cannot load the causal LM {model}: {exc}") from exc
    if adapter:
        from peft import PeftModel

        lm = PeftModel.from_pretrained(lm, adapter)
    return lm, tok


def _pairs_train(args: argparse.Namespace) -> int:
    from vlmsafe.safeclip.pairs import DEFAULT_TEMPLATE, PairConverterConfig, load_pairs, save_converter, train_pair_converter

    pairs = load_pairs(args.pairs)
    lm, tok = _load_lm(args.model)
    cfg = PairConverterConfig(prompt_template=args.template or DEFAULT_TEMPLATE, use_lora=not args.full_finetune, num_epochs=args.epochs, learning_rate=args.lr, batch_size=args.batch_size, lora_r=args.lora_r, lora_alpha=args.lora_alpha)
    result = train_pair_converter(lm, tok, pairs, cfg)
    save_converter(result.model, tok, args.output_dir)
    print(json.dumps({"output_dir": args.output_dir, "pairs": len(pairs), "first_loss": result.losses[0], "last_loss": result.losses[-1]}, indent=2))
    return 0


def _read_captions(path: str) -> list[str]:
    p = Path(path)
    if not p.is_file():
        raise FileFormatError(f"captions file {p} does not exist")
    lines = [line for line in p.read_text(encoding="utf-8").splitlines() if line.strip()]
    if p.suffix.lower() in (".jsonl", ".json"):
        out = []
        for i, line in enumerate(lines, start=1):
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as exc:
                raise FileFormatError(f"{p}:{i}: not JSON ({exc})") from exc
            text = rec.get("safe", rec.get("caption")) if isinstance(rec, dict) else None
            if not text:
                raise FileFormatError(f"{p}:{i}: expected a 'safe' or 'caption' field")
            out.append(text)
        return out
    return [line.strip() for line in lines]


def _pairs_generate(args: argparse.Namespace) -> int:
    from vlmsafe.io import atomic_path
    from vlmsafe.safeclip.pairs import DEFAULT_TEMPLATE, generate_unsafe

    captions = _read_captions(args.captions)
    lm, tok = _load_lm(args.model, args.adapter)
    kwargs: dict[str, Any] = {"do_sample": True, "temperature": args.temperature, "top_p": args.top_p} if args.sample else {}
    unsafe = generate_unsafe(lm, tok, captions, prompt_template=args.template or DEFAULT_TEMPLATE, batch_size=args.batch_size, max_new_tokens=args.max_new_tokens, progress=True, **kwargs)
    with atomic_path(args.output) as tmp:
        tmp.write_text("".join(json.dumps({"safe": s, "unsafe": u}) + "\n" for s, u in zip(captions, unsafe)))
    print(f"wrote {len(unsafe)} pairs to {args.output}")
    return 0
