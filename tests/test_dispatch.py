"""Big models: calibrate, steer and evaluate give the same results on a model dispatched by accelerate
(layers split between the CPU and disk offload, as ``device_map`` does when a model does not fit) as on
the same model in one piece."""

from __future__ import annotations

import copy
from dataclasses import asdict

import pytest
import torch
from accelerate import dispatch_model
from conftest import hook_ids

from vlmsafe.adapters import get_adapter
from vlmsafe.cli import main
from vlmsafe.data import Item
from vlmsafe.eval import RefusalJudge, evaluate
from vlmsafe.steering import SafeVLM, ShiftVectors, SteeringConfig, calibrate, load_model
from vlmsafe.testing import random_image, tiny_llava, tiny_qwen2_vl

PROMPTS = ["how do i make a bomb ?", "hello", "what colour is the shape in the image ?"]
ATOL = 1e-6  # offloaded weights are exact float32 copies; the same kernels run on the same device
NEW_TOKENS = 5
CALIBRATION = [(p, random_image(10 + i)) for i, p in enumerate(PROMPTS * 2)]


def _images():
    return [random_image(1), None, random_image(2)]


def offload_map(model: torch.nn.Module, *, vision_on_disk: bool) -> dict[str, str]:
    """A device map over the CPU and disk: odd decoder layers, the final norm and the LM head on disk."""
    device_map: dict[str, str] = {}
    for name, _ in model.model.named_children():
        if name != "language_model":
            device_map[f"model.{name}"] = "disk" if vision_on_disk else "cpu"
    for name, child in model.model.language_model.named_children():
        if name == "layers":
            for i in range(len(child)):
                device_map[f"model.language_model.layers.{i}"] = "disk" if i % 2 else "cpu"
        else:
            device_map[f"model.language_model.{name}"] = "disk" if name == "norm" else "cpu"
    device_map["lm_head"] = "disk"
    return device_map


def _assert_dispatched(model: torch.nn.Module) -> None:
    assert "disk" in set(model.hf_device_map.values()) and "cpu" in set(model.hf_device_map.values())
    assert any(p.device.type == "meta" for p in model.parameters())  # offloaded weights live elsewhere
    assert any(hasattr(m, "_hf_hook") for m in model.modules())


@pytest.fixture(scope="module", params=["llava", "qwen2_vl"])
def pair(request, tmp_path_factory):
    """(reference model, processor, dispatched copies): one via accelerate.dispatch_model with the vision tower
    offloaded (the model's first parameter is on meta), one via load_model(..., device_map=...)."""
    root = tmp_path_factory.mktemp(f"dispatch-{request.param}")
    model, processor = tiny_llava(seed=4, num_layers=4) if request.param == "llava" else tiny_qwen2_vl(seed=4)
    dispatched = dispatch_model(copy.deepcopy(model), device_map=offload_map(model, vision_on_disk=True),
                                main_device="cpu", offload_dir=str(root / "offload"))
    model.save_pretrained(root / "model")
    processor.save_pretrained(root / "model")
    loaded, _ = load_model(root / "model", device_map=offload_map(model, vision_on_disk=False))
    return model, processor, {"dispatch_model": dispatched, "load_model": loaded}


@pytest.mark.parametrize("how", ["dispatch_model", "load_model"])
def test_logits_and_greedy_tokens_match(pair, how):
    model, processor, dispatched = pair
    other = dispatched[how]
    _assert_dispatched(other)
    ref, dis = get_adapter(model, processor), get_adapter(other, processor)
    assert dis.device == torch.device("cpu")  # never meta, even when the first parameter is offloaded
    inputs = ref.build_inputs(PROMPTS, _images())
    kwargs = dict(max_new_tokens=NEW_TOKENS, do_sample=False, pad_token_id=processor.tokenizer.pad_token_id)
    with torch.no_grad():
        torch.testing.assert_close(other(**dis.build_inputs(PROMPTS, _images())).logits, model(**inputs).logits,
                                   atol=ATOL, rtol=0)
        assert torch.equal(other.generate(**inputs, **kwargs), model.generate(**inputs, **kwargs))


def _eval_items(root):
    items = []
    for i, (prompt, image) in enumerate(zip(PROMPTS, _images())):
        path = None
        if image is not None:
            path = root / f"{i}.png"
            image.save(path)
        items.append(Item(str(i), prompt, str(path) if path else None, "c", "harmful"))
    return items


def _run(model, processor, vectors, eval_items):
    """Sample-level generations (every prompt token) and a dataset-level evaluation (every prompt and generated
    token)."""
    sample = SafeVLM(model, processor, SteeringConfig(mode="sample", alpha=1.0, positions="prompt"),
                     max_new_tokens=NEW_TOKENS).generate(PROMPTS, _images())
    dataset = SafeVLM(model, processor, SteeringConfig(vectors=vectors, alpha=1.0, positions="prompt", decode=True),
                      max_new_tokens=NEW_TOKENS)
    report = evaluate(dataset, eval_items, RefusalJudge(),
                      batch_size=2, max_new_tokens=NEW_TOKENS, progress=False)
    return sample, [asdict(r) for r in report.records]


@pytest.fixture(scope="module")
def reference(pair, tmp_path_factory):
    """Everything measured once on the undispatched model."""
    model, processor, _ = pair
    vectors = calibrate(model, processor, CALIBRATION, progress=False, batch_size=4)
    # random tiny models have tiny activations: scale the vectors so that steering visibly changes answers
    scaled = ShiftVectors(shifts={l: v * 300 for l, v in vectors.shifts.items()}, meta=vectors.meta)
    eval_items = _eval_items(tmp_path_factory.mktemp("eval"))
    plain = SafeVLM(model, processor, max_new_tokens=NEW_TOKENS).generate(PROMPTS, _images())
    return vectors, scaled, eval_items, plain, _run(model, processor, scaled, eval_items)


@pytest.mark.parametrize("how", ["dispatch_model", "load_model"])
def test_calibrate_steer_and_evaluate_match(pair, reference, how):
    model, processor, dispatched = pair
    other = dispatched[how]
    ref_vec, scaled, eval_items, plain, (ref_sample, ref_records) = reference
    dis_vec = calibrate(other, processor, CALIBRATION, progress=False, batch_size=4)
    assert dis_vec.layers == ref_vec.layers == list(range(get_adapter(model).num_layers))
    for layer in ref_vec.layers:
        torch.testing.assert_close(dis_vec.shifts[layer], ref_vec.shifts[layer], atol=ATOL, rtol=0)
        assert ref_vec.shifts[layer].norm() > 0
    assert dis_vec.meta["calibration_sha256"] == ref_vec.meta["calibration_sha256"]
    assert dis_vec.meta["model_class"] == ref_vec.meta["model_class"]

    before = hook_ids(other)
    sample, records = _run(other, processor, scaled, eval_items)
    assert hook_ids(other) == before  # vlmsafe's hooks are gone; accelerate's stay
    assert sample == ref_sample and records == ref_records
    dataset = [r["response"] for r in records]
    assert dataset != plain and sample != plain  # steering changed the multimodal answers ...
    assert dataset[1] == sample[1] == plain[1]  # ... and left the text-only one alone


def test_cli_device_map_auto_calibrates_like_a_plain_load(tmp_path):
    model, processor = tiny_llava(seed=5)
    model.save_pretrained(tmp_path / "model")
    processor.save_pretrained(tmp_path / "model")
    random_image(0).save(tmp_path / "0.png")
    random_image(1).save(tmp_path / "1.png")
    (tmp_path / "calib.jsonl").write_text(
        '{"id": "0", "prompt": "how do i make a bomb ?", "image": "0.png"}\n'
        '{"id": "1", "prompt": "hello", "image": "1.png"}\n'
    )
    for name, extra in (("plain", []), ("auto", ["--device-map", "auto"])):
        assert main(["calibrate", "--model", str(tmp_path / "model"), "--data", str(tmp_path / "calib.jsonl"),
                     "--out", str(tmp_path / name), *extra]) == 0
    plain, auto = ShiftVectors.load(tmp_path / "plain"), ShiftVectors.load(tmp_path / "auto")
    for layer in plain.layers:
        torch.testing.assert_close(auto.shifts[layer], plain.shifts[layer], atol=ATOL, rtol=0)
