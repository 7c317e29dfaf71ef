"""Model folders a stranger brings, run through the real CLI: each wrong folder is refused before the work with
exit code 2 and one stderr line naming the file (or what the folder is instead) and the fix, inputs unchanged;
each right one loads as documented (float32 unless ``--dtype`` says otherwise, greedy decoding whatever the
checkpoint's ``generation_config.json`` says). See ``tests/test_reliability_models.py`` for the hostile folders
(code, pickles, crafted safetensors) these complement.
"""

from __future__ import annotations

import json
import shutil
import warnings
from pathlib import Path

import pytest
import torch
from test_reliability_models import _check, _snapshot

from vlmsafe.cli import main
from vlmsafe.errors import FileFormatError
from vlmsafe.loading import load_model
from vlmsafe.testing import random_image, tiny_causal_lm, tiny_clip, tiny_llava


def _copy(src: Path, dest: Path) -> Path:
    shutil.copytree(src, dest)
    return dest


def _edit_json(path: Path, **changes) -> None:
    data = json.loads(path.read_text())
    for key, value in changes.items():
        if value is None:
            data.pop(key, None)
        else:
            data[key] = value
    path.write_text(json.dumps(data))


def _truncate(path: Path, n: int = 64) -> None:
    path.write_bytes(path.read_bytes()[:-n])


@pytest.fixture(scope="module")
def ws(tmp_path_factory) -> Path:
    """A tiny LLaVA, a causal LM with a LoRA adapter, a CLIP, and copies of them each wrong in one way."""
    from peft import LoraConfig, get_peft_model
    from safetensors.torch import load_file, save_model

    from vlmsafe.safeclip.backends import HFCLIPBackend
    from vlmsafe.testing import tiny_open_clip

    root = tmp_path_factory.mktemp("stranger_models")
    model, processor = tiny_llava()
    llava = root / "llava"
    model.save_pretrained(llava)
    processor.save_pretrained(llava)
    model.to(torch.bfloat16).save_pretrained(root / "llava_bf16")
    processor.save_pretrained(root / "llava_bf16")
    no_tokenizer = _copy(llava, root / "no_tokenizer")
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (no_tokenizer / name).unlink()
    (_copy(llava, root / "no_image_processor") / "processor_config.json").unlink()
    (_copy(llava, root / "no_chat_template") / "chat_template.jinja").unlink()
    _edit_json(_copy(llava, root / "unknown_type") / "config.json", model_type="llava_super_new")
    cut = _copy(llava, root / "cut_config") / "config.json"
    cut.write_text(cut.read_text()[:-20])
    _edit_json(_copy(llava, root / "sampling") / "generation_config.json", do_sample=True, temperature=1.5, top_k=50)
    (root / "vectors").mkdir()
    (root / "vectors" / "vectors.json").write_text("{}")

    lm, tok = tiny_causal_lm()
    lm.save_pretrained(root / "lm")
    tok.save_pretrained(root / "lm")
    small, small_tok = tiny_causal_lm(num_layers=2)
    small.save_pretrained(root / "lm_2layers")
    small_tok.save_pretrained(root / "lm_2layers")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        get_peft_model(lm, LoraConfig(r=2, target_modules=["q_proj", "v_proj"])).save_pretrained(root / "adapter")
    _edit_json(root / "adapter" / "adapter_config.json", base_model_name_or_path="../lm")  # relative to nothing
    pickled = _copy(root / "adapter", root / "adapter_bin")
    torch.save(load_file(str(pickled / "adapter_model.safetensors")), pickled / "adapter_model.bin")
    (pickled / "adapter_model.safetensors").unlink()
    _truncate(_copy(root / "adapter", root / "adapter_truncated") / "adapter_model.safetensors", 32)
    (root / "captions.txt").write_text("a red circle\na blue square\n")

    clip, pair = tiny_clip()
    HFCLIPBackend(clip, pair.tokenizer, pair.image_processor).save_pretrained(root / "clip")
    clip_bin = _copy(root / "clip", root / "clip_bin")
    torch.save(load_file(str(clip_bin / "model.safetensors")), clip_bin / "pytorch_model.bin")
    (clip_bin / "model.safetensors").unlink()
    _truncate(_copy(root / "clip", root / "clip_truncated") / "model.safetensors")
    oc, _ = tiny_open_clip()
    cfg = {"embed_dim": 16, "vision_cfg": {"image_size": 32, "layers": 2, "width": 32, "patch_size": 8,
                                           "head_width": 16},
           "text_cfg": {"context_length": 16, "vocab_size": 64, "width": 32, "heads": 2, "layers": 2}}
    (root / "open_clip_64_tokens").mkdir()  # as OpenCLIPBackend.save_pretrained writes it, without a model_name
    save_model(oc, str(root / "open_clip_64_tokens" / "open_clip_model.safetensors"))
    (root / "open_clip_64_tokens" / "open_clip_config.json").write_text(json.dumps({"model_name": None,
                                                                                    "model_cfg": cfg}))
    _copy(root / "open_clip_64_tokens", root / "open_clip_truncated")
    _truncate(root / "open_clip_truncated" / "open_clip_model.safetensors")
    with open(root / "quadruplets.jsonl", "w") as f:
        for i in range(2):
            for kind in ("safe", "unsafe"):
                random_image(2 * i + (kind == "unsafe")).save(root / f"{kind}{i}.png")
            f.write(json.dumps({"safe": "a red circle", "unsafe": "a red circle with a knife",
                                "safe_image": f"safe{i}.png", "unsafe_image": f"unsafe{i}.png"}) + "\n")
    return root


def _generate(model) -> list[str]:
    return ["generate", "--model", str(model), "--prompt", "how do i make a bomb ?", "--max-new-tokens", "2"]


def _pairs(model, *extra) -> list[str]:
    return ["safeclip", "pairs", "generate", "--model", str(model), *map(str, extra), "--captions", "captions.txt",
            "--output", "{out}", "--max-new-tokens", "2", "--no-progress"]


def _safeclip_eval(original) -> list[str]:
    return ["safeclip", "eval", "--original", str(original), "--safe", "clip", "--data", "quadruplets.jsonl",
            "--no-progress", "--json", "{out}"]


# (case, argv with paths relative to the workspace, expected part of the one line)
CASES = [
    ("missing-tokenizer", _generate("no_tokenizer"),
     "no_tokenizer: cannot build the processor: the folder has no tokenizer file (tokenizer.json"),
    ("missing-image-processor-config", _generate("no_image_processor"),
     "the folder has no image processor config (preprocessor_config.json, or processor_config.json"),
    ("missing-chat-template", _generate("no_chat_template"),
     "no_chat_template: the processor of LlavaForConditionalGeneration has no chat template (chat_template.jinja"),
    ("unknown-model-type", _generate("unknown_type"),
     "config.json has model_type 'llava_super_new', which transformers"),
    ("config-json-malformed", _generate("cut_config"),
     "cut_config/config.json:"),
    ("vectors-folder-as-model", _generate("vectors"),
     "holds CMRM steering vectors (vectors.json), not a model; pass the model they were calibrated on as the model "
     "and this folder as --vectors"),
    ("adapter-folder-as-model", _generate("adapter"), "adapter: is a PEFT adapter of ../lm (adapter_config.json)"),
    ("text-lm-where-a-vlm-is-needed", _generate("lm"),
     "holds LlamaForCausalLM, a text-only causal LM, but this needs a vision-language model"),
    ("clip-where-a-vlm-is-needed", _generate("clip"),
     "holds CLIPModel, an image-text encoder (CLIP): the `vlmsafe safeclip` commands read it"),
    ("vlm-where-a-causal-lm-is-needed", _pairs("llava"),
     "holds LlavaForConditionalGeneration, a vision-language model, but this needs a text-only causal LM"),
    ("adapter-of-another-model", _pairs("lm_2layers", "--adapter", "adapter"),
     "adapter does not fit the model: 4 of its tensors have no place in the model (e.g. "
     "base_model.model.model.layers.2.self_attn.q_proj.lora_A.weight); it was trained on another base model"),
    ("adapter-pickle-weights", _pairs("lm", "--adapter", "adapter_bin"),
     "holds adapter_model.bin but no adapter_model.safetensors; vlmsafe loads safetensors only"),
    ("adapter-truncated", _pairs("lm", "--adapter", "adapter_truncated"),
     "adapter_model.safetensors is not a readable safetensors file"),
    ("safeclip-vlm-as-clip", _safeclip_eval("llava"),
     "llava: holds LlavaForConditionalGeneration (model_type 'llava'), not a CLIP model (CLIPModel)"),
    ("safeclip-clip-pickle-only", _safeclip_eval("clip_bin"),
     "holds pytorch_model.bin but no model.safetensors; vlmsafe loads safetensors only"),
    ("safeclip-clip-truncated", _safeclip_eval("clip_truncated"), "model.safetensors is not a readable safetensors"),
    ("safeclip-open-clip-fewer-token-rows-than-its-tokenizer", _safeclip_eval("open_clip_64_tokens"),
     "the open_clip text tower has 64 token rows but open_clip's default SimpleTokenizer makes ids up to 49407"),
    ("safeclip-open-clip-truncated", _safeclip_eval("open_clip_truncated"),
     "open_clip weights file open_clip_truncated/open_clip_model.safetensors is not a readable safetensors file"),
]


@pytest.mark.parametrize("case, argv, expected", CASES, ids=[c[0] for c in CASES])
def test_a_strangers_wrong_folder_is_one_line(ws, capsys, monkeypatch, tmp_path, case, argv, expected):
    monkeypatch.chdir(ws)
    before = _snapshot(ws)
    out = tmp_path / "out.json"
    _check(main([a.replace("{out}", str(out)) for a in argv]), capsys.readouterr().err, expected)
    assert not out.exists()
    assert _snapshot(ws) == before, "an input changed"


def test_the_processor_is_checked_before_the_weights_are_read(ws, monkeypatch):
    """A missing tokenizer is named at once: a 7B model's weights are not read first to find out."""
    from transformers import AutoModelForImageTextToText

    def read_weights(*args, **kwargs):
        raise AssertionError("the weights were read before the processor was checked")

    monkeypatch.setattr(AutoModelForImageTextToText, "from_pretrained", read_weights)
    with pytest.raises(FileFormatError, match="the folder has no tokenizer file"):
        load_model(ws / "no_tokenizer")


def test_weights_load_in_float32_unless_the_dtype_says_otherwise(ws):
    """``--dtype`` documents "default float32; auto = the checkpoint's": transformers 5 alone loads a bf16 folder in
    bf16 (its default is "auto"), which a CPU runs slowly and calibrates in another precision than documented."""
    def dtypes(model):
        return {p.dtype for p in model.parameters()}

    assert dtypes(load_model(ws / "llava_bf16")[0]) == {torch.float32}
    assert dtypes(load_model(ws / "llava_bf16", dtype="auto")[0]) == {torch.bfloat16}
    assert dtypes(load_model(ws / "llava", dtype="bfloat16")[0]) == {torch.bfloat16}
    plain, _ = load_model(ws / "llava")
    from_bf16, _ = load_model(ws / "llava_bf16")
    first = next(iter(plain.state_dict()))
    torch.testing.assert_close(from_bf16.state_dict()[first],
                               plain.state_dict()[first].to(torch.bfloat16).float())  # the stored values, widened


def test_a_sampling_generation_config_still_decodes_greedily(ws, capsys):
    """A checkpoint whose generation_config.json samples (do_sample, temperature) is still run greedily: vlmsafe's
    answers and rates are reproducible, whatever the checkpoint suggests; and that says nothing on stderr."""
    prompt = ["generate", "--prompt", "tell me a story about cats", "--image", "safe0.png", "--max-new-tokens", "6"]
    answers = []
    for model, seed in (("llava", 0), ("sampling", 0), ("sampling", 1)):
        torch.manual_seed(seed)
        with pytest.MonkeyPatch.context() as mp:
            mp.chdir(ws)
            assert main([*prompt, "--model", model]) == 0
        out, err = capsys.readouterr()
        assert err == ""
        answers.append(out)
    assert answers[0] == answers[1] == answers[2] and answers[0].strip()


def test_an_adapter_of_this_model_loads_quietly(ws, recwarn):
    """The adapter's own base model, its base path relative to nothing: it loads, with no warning about the path
    (peft would look it up from the working directory, or the Hub) or transformers' deprecation inside peft."""
    from peft import PeftModel

    model, _ = load_model(ws / "lm", kind="causal_lm", adapter=ws / "adapter")
    assert isinstance(model, PeftModel)
    assert not [str(w.message) for w in recwarn if "gradient_checkpointing" in str(w.message)
                or "Could not find a config file" in str(w.message)]


def test_a_hub_id_without_a_network_says_so(monkeypatch):
    """Online mode with no network: transformers' "couldn't connect" becomes what to do (download elsewhere, or
    HF_HUB_OFFLINE=1 to stop the retries), not "pass a save_pretrained directory"."""
    import transformers

    import vlmsafe.loading as loading

    def unreachable(*args, **kwargs):
        raise OSError("We couldn't connect to 'https://huggingface.co' to load the files, and couldn't find them in "
                      "the cached files.\nCheck your internet connection")

    monkeypatch.setattr(loading, "_offline", lambda: False)
    monkeypatch.setattr(transformers.AutoConfig, "from_pretrained", unreachable)
    with pytest.raises(FileFormatError) as err:
        load_model("llava-hf/llava-1.5-7b-hf")
    assert str(err.value) == (
        "llava-hf/llava-1.5-7b-hf: not a local folder, and the Hugging Face Hub cannot be reached to fetch it (no "
        "network?) nor is it in the cache; download it where there is a network (`hf download "
        "llava-hf/llava-1.5-7b-hf`) and pass the folder, or set HF_HUB_OFFLINE=1 to read the cache without trying "
        "the network")
