"""Benchmark the streaming safety merge on a synthetic ~1B-parameter LLaVA-shaped checkpoint.

Builds, in a temporary directory and shard by shard (the model is never held in memory):

* ``vlm``      -- LLaVA-1.5-shaped fp16 checkpoint (transformers' in-memory names by default, ``--layout hub``
                  for the llava-hf Hub layout; see ``vlmsafe.merge.keymap``): CLIP ViT-L/14 vision
                  tower (~303M), 2-layer projector, a 12-layer LLaMA-style LM (hidden 2048) with
                  vocabulary 32064 (LLaVA adds tokens); ~1.06B parameters, ~2.1 GB.
* ``aligned``  -- the matching text-only LLaMA checkpoint (``model.layers.N.*``, vocabulary 32000).
* ``vlm_b``    -- a second LLaVA-shaped checkpoint with identical names, for the side-by-side run
                  with mergekit (which cannot map LLaVA names onto an LLM's).

Then runs, each in its own subprocess so that building does not pollute the measurement:

1. ``vlmsafe``  VLM + aligned LLM, linear 0.5, ``vocab_rows: shared`` (the real use case);
2. ``vlmsafe``  VLM + vlm_b, linear 0.5 (same merge as 3), with and without input hashing;
3. ``mergekit`` VLM + vlm_b, linear 0.5, ``mergekit-yaml`` (if mergekit is installed);
4. the **copy floor**: read both inputs of 2 and write an output of the same size (plain
   ``readinto`` / ``write`` in 16 MiB blocks, one thread, ``fsync`` at the end): what any streaming
   merge has to pay for I/O alone on this disk.

Every run is repeated ``--repeat`` times (alternating order, so no run always gets a cold or warm
page cache) and reported as the median with [min, max], with wall time, peak RSS (``ru_maxrss`` of
the child via ``os.wait4``; it includes the interpreter + ``import torch`` baseline, printed as its
own row) and throughput (output bytes / s), then the ratios the targets are stated in. Usage::

    python benchmarks/merge_stream.py                 # full size (~8 GB of disk in a temp dir), 3 repeats
    python benchmarks/merge_stream.py --small         # ~33M parameters, about a minute
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import textwrap
import time
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class Shape:
    vocab_vlm: int
    vocab_lm: int
    hidden: int
    inter: int
    layers: int
    heads: int
    v_hidden: int
    v_inter: int
    v_layers: int
    v_heads: int
    image: int
    patch: int


FULL = Shape(32064, 32000, 2048, 5632, 12, 16, 1024, 4096, 24, 16, 336, 14)
SMALL = Shape(8064, 8000, 512, 1408, 6, 8, 256, 1024, 6, 4, 112, 14)


def lm_tensors(s: Shape, vocab: int) -> list[tuple[str, tuple[int, ...]]]:
    """LLaMA tensor names/shapes in the LLM's own naming."""
    out = [("model.embed_tokens.weight", (vocab, s.hidden))]
    for i in range(s.layers):
        p = f"model.layers.{i}."
        for n in ("q_proj", "k_proj", "v_proj", "o_proj"):
            out.append((p + f"self_attn.{n}.weight", (s.hidden, s.hidden)))
        out += [(p + "mlp.gate_proj.weight", (s.inter, s.hidden)), (p + "mlp.up_proj.weight", (s.inter, s.hidden)),
                (p + "mlp.down_proj.weight", (s.hidden, s.inter)), (p + "input_layernorm.weight", (s.hidden,)),
                (p + "post_attention_layernorm.weight", (s.hidden,))]
    out += [("model.norm.weight", (s.hidden,)), ("lm_head.weight", (vocab, s.hidden))]
    return out


def vlm_tensors(s: Shape, layout: str) -> list[tuple[str, tuple[int, ...]]]:
    """LLaVA tensor names/shapes in transformers' in-memory layout (``model.language_model.*``) or the Hub's."""
    new = layout == "new"
    v = "model.vision_tower." if new else "vision_tower.vision_model."
    proj = "model.multi_modal_projector." if new else "multi_modal_projector."
    n_patch = (s.image // s.patch) ** 2 + 1
    out = [(v + "embeddings.class_embedding", (s.v_hidden,)),
           (v + "embeddings.patch_embedding.weight", (s.v_hidden, 3, s.patch, s.patch)),
           (v + "embeddings.position_embedding.weight", (n_patch, s.v_hidden)),
           (v + "pre_layrnorm.weight", (s.v_hidden,)), (v + "pre_layrnorm.bias", (s.v_hidden,))]
    for i in range(s.v_layers):
        p = f"{v}encoder.layers.{i}."
        for n in ("q_proj", "k_proj", "v_proj", "out_proj"):
            out += [(p + f"self_attn.{n}.weight", (s.v_hidden, s.v_hidden)),
                    (p + f"self_attn.{n}.bias", (s.v_hidden,))]
        for ln in ("layer_norm1", "layer_norm2"):
            out += [(p + f"{ln}.weight", (s.v_hidden,)), (p + f"{ln}.bias", (s.v_hidden,))]
        out += [(p + "mlp.fc1.weight", (s.v_inter, s.v_hidden)), (p + "mlp.fc1.bias", (s.v_inter,)),
                (p + "mlp.fc2.weight", (s.v_hidden, s.v_inter)), (p + "mlp.fc2.bias", (s.v_hidden,))]
    out += [(v + "post_layernorm.weight", (s.v_hidden,)), (v + "post_layernorm.bias", (s.v_hidden,))]
    out += [(proj + "linear_1.weight", (s.hidden, s.v_hidden)), (proj + "linear_1.bias", (s.hidden,)),
            (proj + "linear_2.weight", (s.hidden, s.hidden)), (proj + "linear_2.bias", (s.hidden,))]
    for name, shape in lm_tensors(s, s.vocab_vlm):
        if new:
            name = name if name.startswith("lm_head") else "model.language_model." + name[len("model."):]
        else:
            name = "language_model." + name
        out.append((name, shape))
    return out


def configs(s: Shape) -> tuple[dict, dict]:
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig

    def text(vocab: int) -> LlamaConfig:
        return LlamaConfig(vocab_size=vocab, hidden_size=s.hidden, intermediate_size=s.inter,
                           num_hidden_layers=s.layers, num_attention_heads=s.heads, num_key_value_heads=s.heads,
                           tie_word_embeddings=False, dtype="float16")

    vision = CLIPVisionConfig(hidden_size=s.v_hidden, intermediate_size=s.v_inter, num_hidden_layers=s.v_layers,
                              num_attention_heads=s.v_heads, image_size=s.image, patch_size=s.patch)
    llava = LlavaConfig(text_config=text(s.vocab_vlm), vision_config=vision, image_token_index=s.vocab_vlm - 1,
                        dtype="float16")
    llava.architectures = ["LlavaForConditionalGeneration"]
    lm = text(s.vocab_lm)
    lm.architectures = ["LlamaForCausalLM"]
    return llava.to_dict(), lm.to_dict()


def write_checkpoint(directory: Path, tensors: list[tuple[str, tuple[int, ...]]], config: dict, seed: int,
                     shard_bytes: int) -> int:
    """Write random fp16 tensors shard by shard (bounded memory) plus index and config."""
    import torch
    from safetensors.torch import save_file

    directory.mkdir(parents=True)
    g = torch.Generator().manual_seed(seed)
    shards: list[list[tuple[str, tuple[int, ...]]]] = [[]]
    size = 0
    for name, shape in tensors:
        nb = 2 * math.prod(shape)
        if shards[-1] and size + nb > shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append((name, shape))
        size += nb
    weight_map, total = {}, 0
    for i, shard in enumerate(shards):
        fname = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        data = {n: (torch.randn(shape, generator=g) * 0.02).half() for n, shape in shard}
        save_file(data, str(directory / fname), metadata={"format": "pt"})
        total += sum(t.numel() for t in data.values())
        del data
        weight_map.update({n: fname for n, _ in shard})
    (directory / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": 2 * total}, "weight_map": weight_map}, indent=1))
    (directory / "config.json").write_text(json.dumps(config, indent=1))
    return total


#: Runs only `vlmsafe merge` (the full CLI router would also import every other subcommand's module).
_MERGE_ONLY = (
    "import argparse, sys; from vlmsafe.cli.merge import register; p = argparse.ArgumentParser(); "
    "register(p.add_subparsers()); a = p.parse_args(sys.argv[1:]); sys.exit(a.func(a))"
)


def run_measured(cmd: list[str], env: dict | None = None) -> dict:
    """Run ``cmd``; return wall seconds, peak RSS (MiB) of that process and its exit status."""
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    out = proc.stdout.read() if proc.stdout else ""
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    wall = time.perf_counter() - start
    if proc.returncode != 0:
        print(out[-3000:], file=sys.stderr)
    return {"wall_s": wall, "peak_rss_mib": usage.ru_maxrss / 1024, "rc": proc.returncode, "log": out}


def dir_bytes(d: Path) -> int:
    return sum(f.stat().st_size for f in d.glob("*.safetensors"))


def copy_floor(out: Path, inputs: list[Path]) -> None:
    """Read every weight file of ``inputs`` and write as many bytes as the first input holds (then fsync)."""
    block = 16 << 20
    buf = bytearray(block)
    view = memoryview(buf)
    files = [sorted(d.glob("*.safetensors")) for d in inputs]
    out.mkdir()
    with open(out / "model.safetensors", "wb") as w:
        handles = [[open(f, "rb", buffering=0) for f in fs] for fs in files]  # noqa: SIM115 - closed below
        try:
            for group in zip(*handles):  # shard i of every input, block by block
                while True:
                    n = group[0].readinto(view)
                    for other in group[1:]:
                        other.readinto(view)  # read, discard: the merge reads both inputs
                    if not n:
                        break
                    w.write(view[:n])
            for hs in handles:  # shards beyond the first input's count (none for same-layout inputs)
                for h in hs:
                    while h.readinto(view):
                        pass
        finally:
            for hs in handles:
                for h in hs:
                    h.close()
        w.flush()
        os.fsync(w.fileno())


def build(work: Path, small: bool, layout: str) -> None:
    """Write the three input checkpoints (run in a subprocess: the parent stays small, see run_measured)."""
    shape = SMALL if small else FULL
    shard = (200 if small else 1000) * 10**6  # input shard size, like the Hub's (LLaVA-7B: ~5 GB per shard)
    t0 = time.perf_counter()
    llava_cfg, lm_cfg = configs(shape)
    n_vlm = write_checkpoint(work / "vlm", vlm_tensors(shape, layout), llava_cfg, 0, shard)
    n_lm = write_checkpoint(work / "aligned", lm_tensors(shape, shape.vocab_lm), lm_cfg, 1, shard)
    write_checkpoint(work / "vlm_b", vlm_tensors(shape, layout), llava_cfg, 2, shard)
    print(f"built VLM ({n_vlm / 1e9:.3f}B params, {dir_bytes(work / 'vlm') / 1e9:.2f} GB fp16, {layout} layout), "
          f"VLM_b, and aligned LM ({n_lm / 1e9:.3f}B params) in {time.perf_counter() - t0:.0f}s under {work}")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--small", action="store_true", help="~33M-parameter model: a quick run")
    ap.add_argument("--layout", choices=("new", "hub"), default="new",
                    help="LLaVA key layout: transformers' in-memory names (model.language_model.*) or the llava-hf "
                         "Hub layout (language_model.model.*); mergekit 0.1.5 only understands 'new'")
    ap.add_argument("--workdir", help="where to build checkpoints (default: a temp dir, deleted afterwards); "
                    "checkpoints already there are reused")
    ap.add_argument("--keep", action="store_true", help="keep the work directory")
    ap.add_argument("--no-mergekit", action="store_true", help="skip the mergekit comparison")
    ap.add_argument("--repeat", type=int, default=3, help="run every merge N times (alternating order), report "
                    "medians with [min, max] (default 3)")
    ap.add_argument("--build", help=argparse.SUPPRESS)  # internal: build checkpoints into this dir
    ap.add_argument("--check", help=argparse.SUPPRESS)  # internal: verify outputs in this dir
    ap.add_argument("--copy", nargs="+", help=argparse.SUPPRESS)  # internal: copy floor OUT IN...
    args = ap.parse_args()
    if args.check:
        return check_outputs(Path(args.check))
    if args.copy:
        copy_floor(Path(args.copy[0]), [Path(p) for p in args.copy[1:]])
        return 0
    if args.build:
        build(Path(args.build), args.small, args.layout)
        return 0
    work = Path(args.workdir) if args.workdir else Path(tempfile.mkdtemp(prefix="vlmsafe-merge-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    py = sys.executable
    try:
        if all((work / d / "config.json").is_file() for d in ("vlm", "vlm_b", "aligned")):
            print(f"reusing the checkpoints in {work} (delete them to rebuild)")
            for old in work.glob("out_*"):
                shutil.rmtree(old)
        else:
            b = run_measured([py, __file__, "--build", str(work), "--layout", args.layout] + ["--small"] * args.small)
            print(b["log"].strip())
            if b["rc"] != 0:
                return 1
        have_mk = not args.no_mergekit and shutil.which("mergekit-yaml", path=str(Path(py).parent))
        cli = [py, "-c", _MERGE_ONLY, "merge", "--method", "linear", "--weight", "0.5", "--no-progress"]
        runs: list[tuple[str, list[str], Path | None]] = [
            ("baseline: python + import torch, vlmsafe.merge",
             [py, "-c", "import torch, safetensors, tqdm, vlmsafe.merge"], None),
            ("vlmsafe: VLM + aligned LLM (key map, vocab rows)",
             [*cli, "--vlm", str(work / "vlm"), "--aligned", str(work / "aligned"), "--vocab-rows", "shared",
                    "--out", str(work / "out_vlmsafe_lm")], work / "out_vlmsafe_lm"),
            ("vlmsafe: VLM + VLM_b",
             [*cli, "--vlm", str(work / "vlm"), "--aligned", str(work / "vlm_b"), "--out",
                    str(work / "out_vlmsafe_pair")], work / "out_vlmsafe_pair"),
            ("vlmsafe: VLM + VLM_b, --no-hash",
             [*cli, "--vlm", str(work / "vlm"), "--aligned", str(work / "vlm_b"), "--no-hash", "--out",
                    str(work / "out_vlmsafe_pair_nohash")], work / "out_vlmsafe_pair_nohash"),
            ("copy floor: read VLM + VLM_b, write as much",
             [py, __file__, "--copy", str(work / "out_copy"), str(work / "vlm"), str(work / "vlm_b")],
             work / "out_copy"),
        ]
        if have_mk:
            (work / "mk.yaml").write_text(textwrap.dedent(f"""
                merge_method: linear
                dtype: float16
                models:
                  - model: {work / 'vlm'}
                    parameters: {{weight: 0.5}}
                  - model: {work / 'vlm_b'}
                    parameters: {{weight: 0.5}}
            """))
            mk = str(Path(py).parent / "mergekit-yaml")
            runs.append(("mergekit 0.1.5: VLM + VLM_b (mergekit-yaml)",
                         [mk, str(work / "mk.yaml"), str(work / "out_mergekit"), "--out-shard-size", "1B",
                          "--no-copy-tokenizer", "--quiet", "--no-write-model-card"], work / "out_mergekit"))
        elif not args.no_mergekit:
            print("mergekit not installed (pip install mergekit==0.1.5): comparison skipped")

        results: dict[str, list[dict]] = {label: [] for label, _, _ in runs}
        for rep in range(args.repeat):
            order = runs if rep % 2 == 0 else runs[:1] + runs[1:][::-1]  # alternate order: fair page cache
            for label, cmd, out in order:
                if out is not None and out.exists():
                    shutil.rmtree(out)
                results[label].append(run_measured(cmd))

        title = f"run: median [min, max] of {args.repeat}"
        print(f"\n{title:50s} {'wall s':>20s} {'peak RSS MiB':>13s} "
              f"{'out GB':>7s} {'MB/s out':>9s}")
        medians: dict[str, float] = {}
        rss: dict[str, float] = {}
        for label, _, out in runs:
            rs = results[label]
            if any(r["rc"] != 0 for r in rs):
                print(f"{label:50s} FAILED (exit {[r['rc'] for r in rs]})")
                continue
            walls = [r["wall_s"] for r in rs]
            medians[label] = wall = statistics.median(walls)
            rss[label] = max(r["peak_rss_mib"] for r in rs)
            nbytes = dir_bytes(out) if out else 0
            rate = f"{nbytes / 1e9:7.2f} {nbytes / 1e6 / wall:9.0f}" if out else f"{'-':>7s} {'-':>9s}"
            spread = f"{wall:6.1f} [{min(walls):5.1f}, {max(walls):5.1f}]"
            print(f"{label:50s} {spread:>20s} {rss[label]:13.0f} {rate}")
        pair, floor = runs[2][0], "copy floor: read VLM + VLM_b, write as much"
        mk = next((label for label, _, _ in runs if label.startswith("mergekit")), None)
        print()
        if pair in medians and floor in medians:
            ratio = medians[pair] / medians[floor]
            met = "met" if ratio <= 3 else "NOT met"
            print(f"vlmsafe VLM + VLM_b / copy floor: {ratio:.2f}x (target <= 3x: {met})")
            base = medians.get(runs[0][0])
            if base is not None:
                print(f"  without the interpreter + import torch baseline: "
                      f"{(medians[pair] - base) / medians[floor]:.2f}x")
        if pair in medians and mk in medians:
            ratio = medians[pair] / medians[mk]
            met = "met" if ratio <= 0.5 else "NOT met"
            print(f"vlmsafe VLM + VLM_b / mergekit:   {ratio:.2f}x (target <= 0.5x: {met})")
        worst = max((rss[label] for label in (runs[1][0], pair) if label in rss), default=float("nan"))
        met = "met" if worst < 1024 else "NOT met"
        print(f"vlmsafe peak RSS (both merges): {worst:.0f} MiB (target < 1024 MiB: {met})")
        check = run_measured([py, __file__, "--check", str(work)])
        print(check["log"].strip())
        return 0 if all(r["rc"] == 0 for rs in results.values() for r in rs) and check["rc"] == 0 else 1
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)


def _index(d: Path) -> dict[str, Path]:
    idx = d / "model.safetensors.index.json"
    if idx.is_file():
        return {k: d / v for k, v in json.loads(idx.read_text())["weight_map"].items()}
    from safetensors import safe_open

    f = next(d.glob("*.safetensors"))
    with safe_open(str(f), "pt") as h:
        return dict.fromkeys(list(h.keys()), f)


def _get(index: dict[str, Path], name: str):
    from safetensors import safe_open

    with safe_open(str(index[name]), "pt") as h:
        return h.get_tensor(name)


def check_outputs(work: Path) -> int:
    """Spot-check the outputs: the VLM + LLM merge against a float reference, vlmsafe against mergekit."""
    import torch

    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from vlmsafe.merge.keymap import KeyMap

    km = KeyMap()
    vlm, lm, out = _index(work / "vlm"), _index(work / "aligned"), _index(work / "out_vlmsafe_lm")
    names = sorted(vlm)
    vocab = [n for n in names if n.endswith(("embed_tokens.weight", "lm_head.weight"))]
    sample = names[:: max(1, len(names) // 30)] + vocab
    worst, vision_same = 0.0, True
    for n in sample:
        v, o = _get(vlm, n), _get(out, n)
        a_name = km.find(n, lm)
        if a_name is None:
            vision_same &= torch.equal(v, o)
            continue
        a = _get(lm, a_name)
        r = min(v.shape[0], a.shape[0])
        ref = v.float().clone()
        ref[:r] = 0.5 * v[:r].float() + 0.5 * a[:r].float()
        worst = max(worst, float((o.float() - ref.half().float()).abs().max()))
    print(f"check vlmsafe VLM + LLM: {len(out)}/{len(vlm)} tensors; max |out - fp32 reference| over "
          f"{len(sample)} sampled = {worst:.1e}; vision/projector unchanged: {vision_same}")
    ok = len(out) == len(vlm) and worst < 1e-3 and vision_same
    mk = work / "out_mergekit"
    if mk.is_dir():
        pair, mki = _index(work / "out_vlmsafe_pair"), _index(mk)
        common = sorted(set(pair) & set(mki))
        worst = max((float((_get(pair, n).float() - _get(mki, n).float()).abs().max())
                     for n in common[:: max(1, len(common) // 30)]), default=float("nan"))
        print(f"check vlmsafe vs mergekit (VLM + VLM_b): {len(common)} common tensors (vlmsafe {len(pair)}, "
              f"mergekit {len(mki)}); max |diff| on sampled = {worst:.1e}")
        if len(mki) != len(pair):
            print("  mergekit dropped tensors it could not map (it has no LLaVA architecture definition)")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
