"""Model cards and the Hub: vectors, ShiftDC directions, a Safe-CLIP encoder and a merged model are saved with a
Hub-format card whose metadata matches the settings used, load back by folder and by a Hub id, and push.

The Hub is a local stand-in, never the network: ``HfApi`` is replaced by :class:`FakeHub`, whose uploads become
snapshots in a temporary Hugging Face cache; downloads then run through the real ``snapshot_download`` (and
transformers) in offline mode, which serve that cache, or through a recording fake for the online path.
"""

from __future__ import annotations

import contextlib
import fnmatch
import hashlib
import json
import shutil
from pathlib import Path
from types import SimpleNamespace

import huggingface_hub
import pytest
import torch
import yaml
from huggingface_hub import ModelCard, constants
from huggingface_hub.errors import RepositoryNotFoundError
from huggingface_hub.utils import filter_repo_objects

from vlmsafe.cards import CHECKPOINT_PATTERNS, read_card, resolve
from vlmsafe.errors import FileFormatError, InputError
from vlmsafe.steering import SafetyDirections, ShiftVectors, calibrate, calibrate_shiftdc
from vlmsafe.steering.vectors import VECTOR_FILES
from vlmsafe.testing import random_image, tiny_llava

BASE = "llava-hf/llava-1.5-7b-hf"
CALIB_SHA = "ab" * 32


class FakeHub:
    """``huggingface_hub.HfApi`` backed by a folder: an upload becomes a commit in a Hugging Face cache layout
    (``models--org--name/snapshots/<sha>`` + ``refs/main``), which the real offline ``snapshot_download`` and
    transformers read as if the repository had been downloaded before."""

    def __init__(self, cache: Path) -> None:
        self.cache, self.repos, self.uploads = cache, {}, []

    def __call__(self, token=None):  # HfApi(token=...)
        self.token = token
        return self

    def create_repo(self, repo_id, *, private=None, exist_ok=False, **kwargs):
        if repo_id in self.repos and not exist_ok:
            raise RuntimeError(f"{repo_id} exists")
        self.repos[repo_id] = {"private": private}
        return SimpleNamespace(repo_id=repo_id)

    def upload_folder(self, *, repo_id, folder_path, allow_patterns=None, commit_message=None, **kwargs):
        assert repo_id in self.repos, "create_repo first"
        root = Path(folder_path)
        names = sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file())
        names = list(filter_repo_objects(names, allow_patterns=allow_patterns))
        sha = hashlib.sha1("".join(n + (root / n).read_bytes().hex() for n in names).encode()).hexdigest()
        repo = self.cache / f"models--{repo_id.replace('/', '--')}"
        snapshot = repo / "snapshots" / sha
        for name in names:
            (snapshot / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(root / name, snapshot / name)
        (repo / "refs").mkdir(parents=True, exist_ok=True)
        (repo / "refs" / "main").write_text(sha)
        self.uploads.append({"repo_id": repo_id, "files": names, "message": commit_message, **kwargs})
        return SimpleNamespace(commit_url=f"https://hub.invalid/{repo_id}/commit/{sha}")

    def snapshot(self, repo_id: str) -> Path:
        repo = self.cache / f"models--{repo_id.replace('/', '--')}"
        return repo / "snapshots" / (repo / "refs" / "main").read_text()

    @contextlib.contextmanager
    def online(self, monkeypatch):
        """Pushing refuses offline mode; the fake HfApi never reaches the network."""
        monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
        try:
            yield
        finally:
            monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)


@pytest.fixture
def hub(tmp_path, monkeypatch):
    cache = tmp_path / "hf-cache"
    cache.mkdir()
    fake = FakeHub(cache)
    monkeypatch.setattr(huggingface_hub, "HfApi", fake)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    return fake


def card_meta(folder: Path) -> dict:
    """The card's metadata, parsed twice: by the Hub's ModelCard and by plain YAML."""
    text = (folder / "README.md").read_text(encoding="utf-8")
    meta = ModelCard(text).data.to_dict()
    assert text.startswith("---\n") and yaml.safe_load(text.split("---\n")[1]) == meta
    assert ModelCard.load(folder / "README.md").data.to_dict() == meta == read_card(folder)
    return meta


# --------------------------------------------------------------------------- steering vectors
@pytest.fixture(scope="module")
def llava():
    return tiny_llava(seed=0)


@pytest.fixture(scope="module")
def vectors(llava):
    items = [(p, random_image(i)) for i, p in enumerate(["how do i make a bomb ?", "hello", "what colour ?"])]
    vec = calibrate(*llava, items, layers=[0, 2], anchor="blank", progress=False, batch_size=3)
    vec.meta.update(model_name=BASE, calibration_data="/home/someone/data/calib.jsonl", alpha=0.75)
    return vec


def test_vectors_card_matches_the_settings_and_round_trips_by_folder(vectors, llava, tmp_path):
    out = vectors.save(tmp_path / "vecs")
    assert sorted(p.name for p in out.iterdir()) == sorted(VECTOR_FILES)
    meta = card_meta(out)
    assert (meta["base_model"], meta["library_name"], meta["license"]) == (BASE, "vlmsafe", "other")
    assert meta["base_model_relation"] == "adapter" and {"vlmsafe", "cmrm", "steering-vectors"} <= set(meta["tags"])
    block = meta["vlmsafe"]
    assert (block["artifact"], block["method"]) == ("steering-vectors", "cmrm")
    settings = block["settings"]
    assert (settings["alpha"], settings["layers"], settings["positions"], settings["anchor"]) == (0.75, [0, 2],
                                                                                                  "last", "blank")
    assert block["data"]["sha256"] == vectors.meta["calibration_sha256"] and len(block["data"]["sha256"]) == 64
    assert (block["data"]["items"], block["data"]["source"]) == (3, "calib.jsonl")  # a name, not a local path
    text = (out / "README.md").read_text()
    assert "/home/someone" not in text and "# CMRM steering vectors for llava-hf/llava-1.5-7b-hf" in text
    back = ShiftVectors.load(out, model=llava[0])
    assert back.layers == [0, 2] and all(torch.equal(back[l], vectors[l]) for l in (0, 2))
    assert back.meta["alpha"] == 0.75


def test_vectors_push_then_load_by_hub_id(vectors, llava, hub, monkeypatch):
    with hub.online(monkeypatch):
        url = vectors.push_to_hub("org/cmrm-vectors", private=True)
    assert url.startswith("https://hub.invalid/org/cmrm-vectors/commit/")
    assert hub.repos["org/cmrm-vectors"] == {"private": True}
    assert hub.uploads[0]["files"] == sorted(VECTOR_FILES)
    back = ShiftVectors.load("org/cmrm-vectors", model=llava[0])  # real snapshot_download, offline, from the cache
    assert all(torch.equal(back[l], vectors[l]) for l in (0, 2))
    assert card_meta(hub.snapshot("org/cmrm-vectors"))["vlmsafe"]["settings"]["layers"] == [0, 2]


def test_a_downloaded_folder_gets_the_local_checks(vectors, hub, monkeypatch, tmp_path):
    saved = vectors.save(tmp_path / "vecs")
    tensor = saved / "vectors.safetensors"
    tensor.write_bytes(tensor.read_bytes()[:-8])  # truncated: its recorded sha256 no longer matches
    with hub.online(monkeypatch):
        huggingface_hub.HfApi().create_repo("org/broken")
        huggingface_hub.HfApi().upload_folder(repo_id="org/broken", folder_path=str(saved))
    with pytest.raises(FileFormatError, match=r"vectors\.safetensors is corrupted or truncated"):
        ShiftVectors.load("org/broken")


def test_online_download_fetches_only_the_artefacts_files(vectors, hub, monkeypatch, tmp_path):
    store = tmp_path / "remote"
    vectors.save(store)
    (store / "pytorch_model.bin").write_bytes(b"pickle")  # anything else in the repository stays there
    calls = []

    def fake_snapshot_download(repo_id, *, allow_patterns=None, revision=None, **kwargs):
        calls.append((repo_id, revision, allow_patterns))
        dest = tmp_path / "downloaded"
        dest.mkdir(exist_ok=True)
        for f in store.iterdir():
            if any(fnmatch.fnmatch(f.name, p) for p in allow_patterns):
                shutil.copy2(f, dest / f.name)
        return str(dest)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake_snapshot_download)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    back = ShiftVectors.load("org/remote", revision="v1")
    assert calls == [("org/remote", "v1", list(VECTOR_FILES))]
    assert sorted(p.name for p in (tmp_path / "downloaded").iterdir()) == sorted(VECTOR_FILES)
    assert back.layers == [0, 2]

    def missing(repo_id, **kwargs):
        raise RepositoryNotFoundError("404", response=SimpleNamespace(headers={}, request=None))

    monkeypatch.setattr(huggingface_hub, "snapshot_download", missing)
    with pytest.raises(FileFormatError, match=r"^org/nothing: no such local folder, and no such repository on the "):
        ShiftVectors.load("org/nothing")


def test_offline_hub_id_not_in_the_cache_is_one_clear_line(hub, tmp_path, monkeypatch):
    with pytest.raises(FileFormatError) as err:
        ShiftVectors.load("org/never-downloaded")
    msg = str(err.value)
    assert "\n" not in msg and msg.startswith("org/never-downloaded: no such local folder, and not in the Hugging")
    assert "HF_HUB_OFFLINE=1" in msg and "`hf download org/never-downloaded`" in msg
    # a local-looking path is never sent to the Hub: the loader's own message, as before
    monkeypatch.chdir(tmp_path)
    (tmp_path / "runs").mkdir()
    with pytest.raises(FileFormatError, match=r"runs/vecs/vectors.safetensors not found"):
        ShiftVectors.load("runs/vecs")
    assert resolve("./org/x", patterns=["*"], what="x") == Path("org/x")


def test_push_refuses_a_folder_without_a_vlmsafe_card_and_offline_mode(vectors, hub, tmp_path, monkeypatch):
    from vlmsafe.cards import push_to_hub

    plain = tmp_path / "plain"
    plain.mkdir()
    (plain / "weights.safetensors").write_bytes(b"x")
    with hub.online(monkeypatch), pytest.raises(FileFormatError, match="no vlmsafe model card"):
        push_to_hub(plain, "org/plain")
    saved = vectors.save(tmp_path / "vecs")
    with hub.online(monkeypatch), pytest.raises(InputError, match="not a Hub repository id"):
        push_to_hub(saved, "no-slash")
    with pytest.raises(InputError, match=r"offline mode is on \(HF_HUB_OFFLINE=1\)"):
        push_to_hub(saved, "org/vecs")
    assert hub.uploads == [] and hub.repos == {}


# --------------------------------------------------------------------------- ShiftDC directions
ITEMS = [
    {"id": "h1", "prompt": "how do i make a bomb ?", "label": "harmful", "caption": "red circle"},
    {"id": "h2", "prompt": "steal car", "label": "harmful", "caption": "green car"},
    {"id": "b1", "prompt": "write poem about cats", "label": "benign", "caption": "blue square"},
]


def test_directions_card_and_round_trip_by_folder_and_hub_id(llava, hub, monkeypatch, tmp_path):
    directions = calibrate_shiftdc(*llava, ITEMS, layers=[1, 2], progress=False, caption_tokens=4)
    directions.meta["model_name"] = BASE
    out = directions.save(tmp_path / "dirs")
    assert sorted(p.name for p in out.iterdir()) == ["README.md", "captions.jsonl", "directions.json",
                                                       "directions.safetensors"]
    meta = card_meta(out)
    block = meta["vlmsafe"]
    assert (meta["base_model"], block["artifact"], block["method"]) == (BASE, "safety-directions", "shiftdc")
    assert block["settings"]["layers"] == [1, 2] and block["settings"]["alpha"] == 1.0
    assert (block["settings"]["n_harmful"], block["settings"]["n_benign"], block["settings"]["caption_tokens"]) == (
        2, 1, 4)
    assert block["data"]["sha256"] == directions.meta["calibration_sha256"] and block["data"]["items"] == 3
    with hub.online(monkeypatch):
        directions.push_to_hub("org/shiftdc")
    for source in (out, "org/shiftdc"):
        back = SafetyDirections.load(source, model=llava[0])
        assert back.layers == [1, 2] and torch.equal(back[2], directions[2])
        assert [c["caption"] for c in back.captions] == ["red circle", "green car", "blue square"]


# --------------------------------------------------------------------------- Safe-CLIP encoder
def test_safeclip_encoder_card_and_round_trip(hub, monkeypatch, tmp_path, one_thread):
    from vlmsafe.safeclip import SafeCLIPLossWeights, SafeCLIPTrainer, SafeCLIPTrainingConfig, load_backend
    from vlmsafe.testbed.safeclip import make_splits, quadruplets, render_split, tiny_clip_backend

    data = quadruplets(*render_split(make_splits(0)["train"][:8], 1, 0))
    weights = SafeCLIPLossWeights(G_Sref=0.5, text_nsfw=0.2)
    config = SafeCLIPTrainingConfig(batch_size=8, max_steps=1, lora_r=4, lora_alpha=8, lora_dropout=0.0,
                                    progress=False, early_stopping_patience=None, weights=weights)
    backend = tiny_clip_backend(0, hidden=32, layers=1, vision_layers=1)
    backend.model.config._name_or_path = "openai/clip-vit-base-patch32"  # as if loaded from the Hub
    trainer = SafeCLIPTrainer(backend, config, data)
    trainer.train()
    out = trainer.save_pretrained(tmp_path / "model")
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporaries: one atomic output
    meta = card_meta(out)
    block = meta["vlmsafe"]
    assert (meta["base_model"], meta["library_name"], meta["base_model_relation"]) == (
        "openai/clip-vit-base-patch32", "transformers", "finetune")
    assert (block["artifact"], block["method"]) == ("safe-clip-encoder", "safe-clip")
    s = block["settings"]
    assert (s["use_lora"], s["lora_r"], s["lora_alpha"], s["lora_dropout"]) == (True, 4, 8.0, 0.0)
    assert s["loss_weights"] == weights.as_dict() and s["loss_weights"]["G_Sref"] == 0.5
    assert s["towers"] == list(trainer.towers) and s["global_step"] == 1
    from vlmsafe.safeclip.card import dataset_digest

    assert block["data"]["sha256"] == dataset_digest(data)["sha256"] and block["data"]["items"] == 8
    assert dataset_digest(data)["sha256"] != dataset_digest(quadruplets(*render_split(
        make_splits(0)["train"][1:9], 1, 0)))["sha256"]
    assert json.loads((out / "safeclip_training.json").read_text())["config"]["lora_r"] == 4
    with hub.online(monkeypatch):
        trainer.push_to_hub("org/safe-clip")
    assert "README.md" in hub.uploads[0]["files"] and "model.safetensors" in hub.uploads[0]["files"]
    tok = backend.tokenize(["a red circle"])
    expected = None
    for source in (out, "org/safe-clip"):
        loaded = load_backend(source)
        with torch.no_grad():
            emb = loaded.encode_text(loaded.model, tok)
        expected = emb if expected is None else expected
        torch.testing.assert_close(emb, expected)
    with pytest.raises(FileFormatError, match=r"^org/missing-clip: no such local folder, and not in the Hugging"):
        load_backend("org/missing-clip")


# --------------------------------------------------------------------------- merged model
def tiny_merge_inputs(root: Path) -> None:
    """``root/vlm`` (a tiny LLaVA with a card of its own) and ``root/lm`` (its Llama): a merge in milliseconds."""
    from transformers import (
        CLIPVisionConfig,
        LlamaConfig,
        LlamaForCausalLM,
        LlavaConfig,
        LlavaForConditionalGeneration,
    )

    text = dict(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2,
                num_key_value_heads=2, max_position_embeddings=64, tie_word_embeddings=False)
    vc = CLIPVisionConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                          image_size=16, patch_size=8, projection_dim=16)
    torch.manual_seed(0)
    LlavaForConditionalGeneration(LlavaConfig(text_config=LlamaConfig(**text), vision_config=vc,
                                              image_token_index=63)).save_pretrained(root / "vlm")
    (root / "vlm" / "README.md").write_text("# the VLM's own card\n")
    LlamaForCausalLM(LlamaConfig(**text)).save_pretrained(root / "lm")


def test_merged_model_card_carries_the_recipe_and_round_trips(hub, monkeypatch, tmp_path):
    from transformers import LlavaForConditionalGeneration

    from vlmsafe.merge import MergeConfig, merge_checkpoints

    tiny_merge_inputs(tmp_path)
    weight = {"default": 0.4, "layers": [0.2, 0.6]}
    cfg = MergeConfig(vlm=tmp_path / "vlm", aligned=tmp_path / "lm", output=tmp_path / "merged", weight=weight)
    result = merge_checkpoints(cfg, progress=False)
    meta = card_meta(result.output)
    block = meta["vlmsafe"]
    assert (meta["library_name"], meta["pipeline_tag"], block["artifact"], block["method"]) == (
        "transformers", "image-text-to-text", "merged-model", "linear")
    assert "base_model" not in meta  # local inputs: not Hub ids, kept in the vlmsafe block only
    assert block["base_model"] == [str(tmp_path / "vlm"), str(tmp_path / "lm")]
    assert block["settings"]["weight"] == weight and block["settings"]["method"] == "linear"
    recipe = json.loads((result.output / "vlmsafe_merge.json").read_text())
    vlm_hashes = recipe["inputs"]["vlm"]["sha256"]
    assert block["data"]["inputs"]["vlm"]["files"] == len(vlm_hashes) and len(block["data"]["sha256"]) == 64
    card_text = (result.output / "README.md").read_text()
    assert "the VLM's own card" not in card_text
    yaml_block = card_text.split("```yaml\n")[1].split("```")[0]
    assert yaml.safe_load(yaml_block) == {k: v for k, v in recipe["config"].items() if k != "overwrite"}
    again = MergeConfig.from_dict({**yaml.safe_load(yaml_block), "output": tmp_path / "again"})
    assert again.weight.to_json() == weight  # the card's recipe is a merge config vlmsafe reads
    with hub.online(monkeypatch):
        result.push_to_hub("org/merged")
    assert "vlmsafe_merge.json" in hub.uploads[0]["files"]
    ref = LlavaForConditionalGeneration.from_pretrained(result.output).state_dict()
    hub_model = LlavaForConditionalGeneration.from_pretrained("org/merged")  # from the stand-in Hub's cache
    assert set(hub_model.state_dict()) == set(ref)
    assert all(torch.equal(v, ref[k]) for k, v in hub_model.state_dict().items())
    folder = resolve("org/merged", patterns=CHECKPOINT_PATTERNS, what="a model folder")
    assert folder == hub.snapshot("org/merged") and card_meta(folder) == meta


def test_merge_card_lists_hub_inputs_as_base_models():
    from vlmsafe.merge.writer import merge_card

    recipe = {"config": {"vlm": BASE, "aligned": "lmsys/vicuna-7b-v1.5", "output": "out", "method": "ties",
                         "weight": 0.3, "density": 0.5},
              "inputs": {"vlm": {"path": "/cache/x", "sha256": {"model.safetensors": "1" * 64}},
                         "aligned": {"path": "/cache/y", "sha256": None}}}
    meta = ModelCard(merge_card(recipe)).data.to_dict()
    assert meta["base_model"] == [BASE, "lmsys/vicuna-7b-v1.5"] and meta["base_model_relation"] == "merge"
    assert meta["vlmsafe"]["settings"]["density"] == 0.5 and meta["vlmsafe"]["data"]["sha256"] is None


def test_generate_cli_takes_vectors_by_hub_id(vectors, llava, hub, monkeypatch, tmp_path, capsys):
    from vlmsafe.cli import main

    model, processor = llava
    model.save_pretrained(tmp_path / "model")
    processor.save_pretrained(tmp_path / "model")
    with hub.online(monkeypatch):
        vectors.push_to_hub("org/cmrm")
    common = ["generate", "--model", str(tmp_path / "model"), "--prompt", "hello", "--max-new-tokens", "2",
              "--alpha", "1"]
    assert main([*common, "--vectors", "org/cmrm"]) == 0
    capsys.readouterr()
    assert main([*common, "--vectors", "org/not-downloaded"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("vlmsafe generate: error: org/not-downloaded: no such local folder")


def test_a_recorded_alpha_is_checked_on_load(vectors, tmp_path):
    out = vectors.save(tmp_path / "vecs")
    meta = json.loads((out / "vectors.json").read_text())
    (out / "vectors.json").write_text(json.dumps({**meta, "alpha": "strong"}))
    with pytest.raises(FileFormatError, match=r"field 'alpha' must be a number >= 0, got \"strong\""):
        ShiftVectors.load(out)


# --------------------------------------------------------------------------- the CLI's --push-to-hub
def uploaded_equals_written(hub: FakeHub, repo_id: str, folder: Path) -> None:
    """The Hub repository holds every file of the written folder, byte for byte."""
    written = sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file())
    snapshot = hub.snapshot(repo_id)
    assert sorted(str(p.relative_to(snapshot)) for p in snapshot.rglob("*") if p.is_file()) == written
    assert all((snapshot / name).read_bytes() == (folder / name).read_bytes() for name in written)


@pytest.fixture(scope="module")
def llava_folder(llava, tmp_path_factory):
    """The tiny LLaVA saved, and a JSONL of labelled prompts with images and captions for calibrate."""
    root = tmp_path_factory.mktemp("push_cli")
    model, processor = llava
    model.save_pretrained(root / "model")
    processor.save_pretrained(root / "model")
    lines = []
    for i, item in enumerate(ITEMS):
        random_image(i).save(root / f"{i}.png")
        lines.append(json.dumps({**item, "image": f"{i}.png"}))
    (root / "data.jsonl").write_text("\n".join(lines) + "\n")
    return root


@pytest.mark.parametrize("method", ["cmrm", "shiftdc"])
def test_calibrate_push_to_hub_uploads_the_written_folder(method, llava_folder, llava, hub, monkeypatch, tmp_path,
                                                          capsys):
    from vlmsafe.cli import main

    out = tmp_path / "out"
    argv = ["calibrate", "--model", str(llava_folder / "model"), "--data", str(llava_folder / "data.jsonl"),
            "--layers", "1-2", "--method", method, "--out", str(out), "--no-progress", "--push-to-hub", "org/cli",
            "--hub-private", "--hub-token", "hf_x"]
    if method == "shiftdc":
        argv += ["--caption-tokens", "2"]
    with hub.online(monkeypatch):
        assert main(argv) == 0, capsys.readouterr().err
    err = capsys.readouterr().err
    assert f"pushed {out} to the Hub repository org/cli: https://hub.invalid/org/cli/commit/" in err
    assert hub.repos == {"org/cli": {"private": True}} and hub.token == "hf_x" and len(hub.uploads) == 1
    uploaded_equals_written(hub, "org/cli", out)
    assert card_meta(hub.snapshot("org/cli"))["vlmsafe"]["method"] == card_meta(out)["vlmsafe"]["method"]
    if method == "cmrm":
        local, remote = ShiftVectors.load(out, model=llava[0]), ShiftVectors.load("org/cli", model=llava[0])
        assert local.layers == remote.layers == [1, 2]
        assert all(torch.equal(local[layer], remote[layer]) for layer in local.layers)
    else:
        local, remote = SafetyDirections.load(out), SafetyDirections.load("org/cli")
        assert local.layers == remote.layers


def test_merge_and_safeclip_train_push_to_hub(hub, monkeypatch, tmp_path, capsys, one_thread):
    from vlmsafe.cli import main
    from vlmsafe.testbed.safeclip import make_splits, render_split, tiny_clip_backend

    tiny_merge_inputs(tmp_path)
    with hub.online(monkeypatch):
        assert main(["merge", "--vlm", str(tmp_path / "vlm"), "--aligned", str(tmp_path / "lm"), "--weight", "0.3",
                     "--out", str(tmp_path / "merged"), "--no-progress", "--push-to-hub", "org/merged"]) == 0
    uploaded_equals_written(hub, "org/merged", tmp_path / "merged")
    assert card_meta(hub.snapshot("org/merged"))["vlmsafe"]["settings"]["weight"] == 0.3
    assert hub.repos["org/merged"] == {"private": None} and hub.token is None  # the defaults: login's token

    tiny_clip_backend(0, hidden=32, layers=1, vision_layers=1).save_pretrained(tmp_path / "clip")
    records, safe, unsafe = render_split(make_splits(0)["train"][:4], 1, 0)
    from PIL import Image

    lines = []
    for i, r in enumerate(records):
        Image.fromarray(safe[i].permute(1, 2, 0).numpy()).save(tmp_path / f"v{i}.png")
        Image.fromarray(unsafe[i].permute(1, 2, 0).numpy()).save(tmp_path / f"g{i}.png")
        lines.append(json.dumps({"safe": r["safe"], "unsafe": r["unsafe"], "safe_image": f"v{i}.png",
                                 "unsafe_image": f"g{i}.png"}))
    (tmp_path / "quads.jsonl").write_text("\n".join(lines) + "\n")
    capsys.readouterr()
    with hub.online(monkeypatch):
        assert main(["safeclip", "train", "--model", str(tmp_path / "clip"), "--data", str(tmp_path / "quads.jsonl"),
                     "--output-dir", str(tmp_path / "run"), "--batch-size", "4", "--max-steps", "1", "--lora-r", "2",
                     "--val-fraction", "0", "--no-progress", "--push-to-hub", "org/safe-clip"]) == 0
    assert json.loads(capsys.readouterr().out)["global_step"] == 1  # stdout stays the JSON summary
    uploaded_equals_written(hub, "org/safe-clip", tmp_path / "run" / "model")
    assert card_meta(hub.snapshot("org/safe-clip"))["vlmsafe"]["artifact"] == "safe-clip-encoder"


@pytest.mark.parametrize("extra, expected", [
    (["--push-to-hub", "org/x"], "vlmsafe calibrate: error: --push-to-hub: cannot push to org/x: offline mode is "
                                 "on (HF_HUB_OFFLINE=1); unset it to upload"),
    (["--push-to-hub", "no-slash"], "vlmsafe calibrate: error: --push-to-hub: repo_id 'no-slash' is not a Hub "
                                    "repository id; write it as 'user-or-org/name'"),
    (["--hub-private"], "vlmsafe calibrate: error: --hub-private set(s) how to upload, but nothing is uploaded; add "
                        "--push-to-hub REPO_ID or drop it"),
])
def test_push_to_hub_refused_before_the_work_in_one_line(extra, expected, llava_folder, hub, tmp_path, capsys):
    """Offline mode (the hub fixture's) or a bad id stops the command before it loads a model or writes."""
    from vlmsafe.cli import main

    code = main(["calibrate", "--model", str(tmp_path / "no-model-here"), "--data", str(llava_folder / "data.jsonl"),
                 "--out", str(tmp_path / "out"), "--no-progress", *extra])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and err == [expected]
    assert not (tmp_path / "out").exists() and hub.uploads == [] and hub.repos == {}


@pytest.mark.parametrize("command", [["merge", "--vlm", "a", "--aligned", "b", "--out", "c"],
                                     ["safeclip", "train", "--model", "m", "--data", "d", "--output-dir", "o"]])
def test_merge_and_safeclip_refuse_an_offline_push_first(command, hub, tmp_path, monkeypatch, capsys):
    from vlmsafe.cli import main

    monkeypatch.chdir(tmp_path)
    assert main([*command, "--push-to-hub", "org/x"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--push-to-hub: cannot push to org/x: offline mode is on" in err[0], err


def test_a_failed_upload_keeps_the_output_and_says_how_to_retry(llava_folder, hub, monkeypatch, tmp_path, capsys):
    from vlmsafe.cli import main

    def refuse(**kwargs):
        raise OSError("Connection reset by peer")

    monkeypatch.setattr(hub, "upload_folder", refuse)
    out = tmp_path / "out"
    with hub.online(monkeypatch):
        code = main(["calibrate", "--model", str(llava_folder / "model"), "--data", str(llava_folder / "data.jsonl"),
                     "--layers", "1", "--out", str(out), "--no-progress", "--push-to-hub", "org/x"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and err == [f"vlmsafe calibrate: error: {out} was written, but the upload to org/x failed "
                                 f"(Connection reset by peer); retry with `hf upload org/x {out}` or "
                                 "vlmsafe.cards.push_to_hub"]
    assert (out / "vectors.safetensors").is_file() and (out / "README.md").is_file()
