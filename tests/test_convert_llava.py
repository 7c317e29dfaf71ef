"""``vlmsafe convert-llava``: original LLaVA (liuhaotian v1.5 / v1.6) -> transformers, checked against a model
assembled by hand from the same tensors."""

from __future__ import annotations

import json

import pytest
import torch
from fixtures.merge_llava_original import PINPOINTS, write_original_llava

from vlmsafe.cli import main
from vlmsafe.convert import convert_llava
from vlmsafe.errors import FileFormatError, InputError, OutputExistsError
from vlmsafe.testing import random_image

transformers = pytest.importorskip("transformers")


def hand_assembled(o, image_token_id: int, vocab: int, *, tuned_vision: bool = False):
    """The same weights put into a transformers model module by module, with a config written here."""
    from transformers import LlamaConfig, LlavaConfig, LlavaForConditionalGeneration, LlavaNextConfig
    from transformers import LlavaNextForConditionalGeneration as Next

    text = LlamaConfig(**{**o.text_config.to_dict(), "vocab_size": vocab})
    common = dict(text_config=text, vision_config=o.vision_config, image_token_index=image_token_id,
                  vision_feature_select_strategy="default", vision_feature_layer=-2, projector_hidden_act="gelu")
    if o.version == "1.6":
        model = Next(LlavaNextConfig(**common, image_grid_pinpoints=PINPOINTS)).eval()
    else:
        model = LlavaForConditionalGeneration(LlavaConfig(**common)).eval()
    t = {k: v.float() for k, v in o.tensors.items()}
    with torch.no_grad():
        lm = model.model.language_model
        for name, param in lm.named_parameters():
            src = t["model." + name]
            if name == "embed_tokens.weight":
                src = torch.cat([src, src.mean(0, keepdim=True).half().float().expand(vocab - src.shape[0], -1)])
            param.copy_(src)
        head = t["lm_head.weight"]
        model.lm_head.weight.copy_(torch.cat([head, head.mean(0, keepdim=True).half().float()
                                              .expand(vocab - head.shape[0], -1)]))
        proj = model.model.multi_modal_projector
        proj.linear_1.weight.copy_(t["model.mm_projector.0.weight"])
        proj.linear_1.bias.copy_(t["model.mm_projector.0.bias"])
        proj.linear_2.weight.copy_(t["model.mm_projector.2.weight"])
        proj.linear_2.bias.copy_(t["model.mm_projector.2.bias"])
        if o.version == "1.6":
            model.model.image_newline.copy_(t["model.image_newline"])
        prefix = "model.vision_tower.vision_tower.vision_model."
        vision = ({k[len(prefix):]: v for k, v in t.items() if k.startswith(prefix)} if tuned_vision
                  else {k: v.half().float() for k, v in o.vision.items()})
        missing, unexpected = model.model.vision_tower.load_state_dict(vision, strict=False)
        assert not unexpected and all("position_ids" in k for k in missing)
    return model


def _inputs(processor):
    msgs = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "what colour is the shape ?"}]}]
    prompt = processor.apply_chat_template(msgs, add_generation_prompt=True)
    return prompt, processor(images=random_image(3, size=48), text=prompt, return_tensors="pt")


@pytest.mark.parametrize(("version", "fmt", "tuned"), [("1.5", "bin", False), ("1.6", "safetensors", False),
                                                       ("1.6", "bin", True)])
def test_converted_model_loads_and_matches_hand_assembled_forward(tmp_path, version, fmt, tuned):
    from transformers import AutoModelForImageTextToText, AutoProcessor

    o = write_original_llava(tmp_path, version=version, fmt=fmt, tuned_vision=tuned)
    res = convert_llava(o.path, o.vision_path, tmp_path / "hf", progress=False)
    expected_cls = "LlavaNextForConditionalGeneration" if version == "1.6" else "LlavaForConditionalGeneration"
    assert res.architecture == expected_cls and res.added_tokens == ["<image>"] and res.dropped_buffers == 2
    assert res.vision_source.startswith("original" if tuned else "--vision")

    model, info = AutoModelForImageTextToText.from_pretrained(res.output, dtype=torch.float32,
                                                              output_loading_info=True)
    assert type(model).__name__ == expected_cls
    assert not any(info[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys"))
    processor = AutoProcessor.from_pretrained(res.output)
    image_id = processor.tokenizer.convert_tokens_to_ids("<image>")
    vocab = o.text_config.vocab_size + 1
    assert image_id == o.text_config.vocab_size and model.config.text_config.vocab_size == vocab

    prompt, inputs = _inputs(processor)
    assert prompt.endswith("USER: <image>\nwhat colour is the shape ? ASSISTANT:")
    assert prompt.startswith("A chat between a curious human")
    n_image = int((inputs["input_ids"] == image_id).sum())
    assert n_image >= 16  # (32 / 8)^2 patches, more with AnyRes tiles
    ref = hand_assembled(o, image_id, vocab, tuned_vision=tuned)
    with torch.no_grad():
        got, want = model(**inputs).logits, ref(**inputs).logits
    assert torch.allclose(got, want, atol=1e-5, rtol=0), float((got - want).abs().max())
    # the added token's LM-head row is the mean row: it never wins against the original vocabulary
    assert bool((got[..., image_id] < got[..., :image_id].max(-1).values).all())

    saved = json.loads((res.output / "config.json").read_text())
    assert saved["architectures"] == [expected_cls] and saved["vision_feature_layer"] == -2
    safetensors_files = list(res.output.glob("*.safetensors"))
    assert safetensors_files and not list(res.output.glob("*.bin"))  # output is always safetensors
    recipe = json.loads((res.output / "vlmsafe_convert.json").read_text())
    assert set(recipe["inputs"]["original"]["sha256"]) >= {p.name for p in o.path.glob("pytorch_model*.bin")}


def test_v15_image_processor_pads_to_square_like_the_original(tmp_path):
    from transformers import AutoProcessor

    o = write_original_llava(tmp_path, version="1.5", fmt="safetensors", shards=1)
    out = convert_llava(o.path, o.vision_path, tmp_path / "hf", progress=False).output
    ip = AutoProcessor.from_pretrained(out).image_processor
    assert type(ip).__name__.startswith("LlavaImageProcessor") and ip.do_pad is True


def test_convert_refuses_bad_inputs_before_writing(tmp_path):
    from transformers import LlavaForConditionalGeneration

    from vlmsafe.testing import tiny_llava

    o = write_original_llava(tmp_path, version="1.5", fmt="bin")
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "mine.txt").write_text("keep me")
    with pytest.raises(OutputExistsError, match="non-empty directory; pass `overwrite=True`"):
        convert_llava(o.path, o.vision_path, tmp_path / "taken", progress=False)
    assert (tmp_path / "taken" / "mine.txt").read_text() == "keep me"

    hf, _ = tiny_llava()
    assert isinstance(hf, LlavaForConditionalGeneration)
    hf.save_pretrained(tmp_path / "already_hf")
    with pytest.raises(InputError, match="already a transformers LLaVA: no conversion needed"):
        convert_llava(tmp_path / "already_hf", o.vision_path, tmp_path / "x", progress=False)

    cfg = json.loads((o.path / "config.json").read_text())
    (o.path / "config.json").write_text(json.dumps({**cfg, "mm_projector_type": "linear"}))
    with pytest.raises(InputError, match="mm_projector_type 'linear' is not supported"):
        convert_llava(o.path, o.vision_path, tmp_path / "x", progress=False)
    (o.path / "config.json").write_text(json.dumps({**cfg, "mm_hidden_size": 1024}))
    with pytest.raises(InputError, match=r"hidden size 24 but .* tower of 1024"):
        convert_llava(o.path, o.vision_path, tmp_path / "x", progress=False)
    (o.path / "config.json").write_text(json.dumps(cfg))

    extra = write_original_llava(tmp_path / "extra", version="1.5", fmt="safetensors", shards=1)
    from safetensors.torch import save_file

    save_file({**extra.tensors, "model.vision_resampler.weight": torch.ones(2)},
              str(extra.path / "model.safetensors"))
    with pytest.raises(FileFormatError, match=r"model\.vision_resampler\.weight: not part of an original LLaVA"):
        convert_llava(extra.path, extra.vision_path, tmp_path / "x", progress=False)
    assert not (tmp_path / "x").exists()


def test_cli_convert_llava(tmp_path, capsys):
    o = write_original_llava(tmp_path, version="1.6", fmt="bin")
    out = tmp_path / "hf"
    args = ["convert-llava", str(o.path), "--vision", str(o.vision_path), "--out", str(out)]
    assert main([*args, "--no-progress"]) == 0
    assert "LlavaNextForConditionalGeneration" in capsys.readouterr().out and (out / "config.json").is_file()
    assert main(["convert-llava", str(o.path), "--vision", str(o.vision_path), "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert "non-empty directory; pass --overwrite" in err and len(err.strip().splitlines()) == 1
    assert main(["convert-llava", str(o.path), "--vision", str(o.vision_path), "--out", str(out), "--overwrite",
                 "--no-progress", "--chat-template", "mistral"]) == 0
    assert "[INST]" in (out / "chat_template.jinja").read_text()


@pytest.mark.parametrize("size", ["-1", "0", "lots"])
def test_cli_convert_llava_checks_the_shard_size_when_parsing(tmp_path, capsys, size):
    rc = main(["convert-llava", str(tmp_path / "nope"), "--out", str(tmp_path / "hf"), f"--max-shard-size={size}"])
    err = capsys.readouterr().err
    assert rc == 2 and len(err.strip().splitlines()) == 1 and "--max-shard-size" in err and "2GB" in err
    assert not (tmp_path / "hf").exists()
