"""Unit tests of probes/: the probe, the shift metrics, the weight comparison, activation collection."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from probes.analysis import check_split, split_items, split_sizes
from probes.collect import collect_activations, vectors_from_activations
from probes.linear import fit_probe, labels_from_items
from probes.shift import cosine_distance, l2_distance, layer_shift_metrics, linear_cka, shift_on_direction
from probes.weights import canonical_name, classify, weight_change
from vlmsafe.activations import record_activations
from vlmsafe.adapters import get_adapter
from vlmsafe.data import Item
from vlmsafe.errors import FileFormatError, InputError
from vlmsafe.steering import SteeringConfig, calibrate, steer
from vlmsafe.testing import random_image, tiny_llava


# --------------------------------------------------------------------------- probes
def _separable(n: int = 160, d: int = 24, seed: int = 0):
    rng = np.random.default_rng(seed)
    direction = rng.normal(size=d)
    direction /= np.linalg.norm(direction)
    y = np.arange(n) % 2
    X = rng.normal(size=(n, d)) + np.outer(np.where(y == 1, 3.0, -3.0), direction)
    return X, y, direction


def test_probe_on_separable_activations_is_near_perfect():
    X, y, direction = _separable()
    probe = fit_probe(X[:100], y[:100], cv=5)
    metrics = probe.evaluate(X[100:], y[100:])
    assert probe.cv_accuracy >= 0.97
    assert metrics["accuracy"] >= 0.98
    assert metrics["auroc"] >= 0.99
    assert metrics["harmful_recall"] >= 0.95 and metrics["benign_recall"] >= 0.95
    # the harmful direction points along the true class direction, harmful side positive
    assert float(probe.direction @ direction) > 0.85
    assert np.isclose(np.linalg.norm(probe.direction), 1.0)


def test_probe_on_shuffled_labels_stays_near_chance():
    rng = np.random.default_rng(1)
    X = rng.normal(size=(400, 24))
    y = rng.permutation(np.arange(400) % 2)
    probe = fit_probe(X[:200], y[:200], cv=5)
    acc = probe.evaluate(X[200:], y[200:])["accuracy"]
    assert 0.38 <= acc <= 0.62
    assert probe.cv_accuracy <= 0.65


def test_probe_needs_both_classes():
    X = np.zeros((10, 4))
    with pytest.raises(InputError, match=r"harmful and .* benign"):
        fit_probe(X, np.ones(10, dtype=int))
    items = [Item(id="1", prompt="p", label="harmful"), Item(id="2", prompt="q", label="benign")]
    assert labels_from_items(items).tolist() == [1, 0]


# --------------------------------------------------------------------------- shift metrics
def _cka_reference(X: np.ndarray, Y: np.ndarray) -> float:
    X = X - X.mean(0)
    Y = Y - Y.mean(0)
    return np.linalg.norm(Y.T @ X) ** 2 / (np.linalg.norm(X.T @ X) * np.linalg.norm(Y.T @ Y))


@pytest.mark.parametrize("n,d", [(60, 12), (10, 40)])  # feature-space and Gram-space branches
def test_linear_cka_identity_rotation_scaling(n, d):
    rng = np.random.default_rng(0)
    X = rng.normal(size=(n, d))
    Q, _ = np.linalg.qr(rng.normal(size=(d, d)))
    assert linear_cka(X, X) == pytest.approx(1.0, abs=1e-10)
    assert linear_cka(X, X @ Q) == pytest.approx(1.0, abs=1e-10)
    assert linear_cka(X, 3.7 * X + 5.0) == pytest.approx(1.0, abs=1e-10)  # isotropic scaling + offset
    Y = rng.normal(size=(n, d + 3))
    assert linear_cka(X, Y) == pytest.approx(_cka_reference(X, Y), rel=1e-9)
    assert linear_cka(X, Y) < 0.9
    # an anisotropic rescaling is *not* an invariance
    assert linear_cka(X, X * np.linspace(0.1, 10, d)) < 0.99


def test_distances():
    X = np.array([[1.0, 0.0], [0.0, 2.0]])
    assert cosine_distance(X, X) == pytest.approx(0.0)
    assert cosine_distance(X, -X) == pytest.approx(2.0)
    assert l2_distance(X, X + np.array([3.0, 4.0])) == pytest.approx(5.0)
    m = layer_shift_metrics(X, X)
    assert m["cosine_distance"] == pytest.approx(0) and m["l2_distance"] == 0 and m["cka"] == pytest.approx(1)
    with pytest.raises(InputError, match="same n"):
        cosine_distance(X, X[:1])


def test_shift_on_direction_gap_ratio():
    direction = np.array([2.0, 0.0, 0.0])
    harmful, benign = np.array([4.0, 1.0, 0.0]), np.array([0.0, 1.0, 0.0])
    out = shift_on_direction(np.array([-2.0, 3.0, 0.0]), direction, harmful_mean=harmful, benign_mean=benign)
    assert out["projection"] == pytest.approx(-2.0)
    assert out["gap_ratio"] == pytest.approx(-0.5)
    assert out["cosine"] == pytest.approx(-2.0 / np.sqrt(13.0))


# --------------------------------------------------------------------------- weights
def test_name_mapping_and_classification():
    q = "self_attn.q_proj.weight"
    down = "layers.3.mlp.down_proj.weight"
    assert canonical_name(f"model.language_model.{down}") == f"model.{down}"
    assert canonical_name(f"language_model.model.layers.0.{q}") == f"model.layers.0.{q}"
    assert canonical_name(f"model.layers.0.{q}") == f"model.layers.0.{q}"  # original LLaVA: already the LLM's name
    assert canonical_name("language_model.lm_head.weight") == "lm_head.weight"
    vision = "model.vision_tower.vision_model.encoder.layers.0.mlp.fc1.weight"
    assert canonical_name(vision) == vision
    assert classify("model.layers.3.self_attn.q_proj.weight") == (3, "self_attn.q_proj")
    assert classify("model.layers.0.input_layernorm.weight") == (0, "input_layernorm")
    assert classify("model.norm.weight") == (None, "final_norm")
    assert classify("lm_head.weight") == (None, "lm_head")


def _lm_state(seed: int, layers: int = 3) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    out = {"model.embed_tokens.weight": torch.randn(20, 8, generator=g), "model.norm.weight": torch.ones(8),
           "lm_head.weight": torch.randn(20, 8, generator=g)}
    for l in range(layers):
        for m in ("self_attn.q_proj", "mlp.down_proj"):
            out[f"model.layers.{l}.{m}.weight"] = torch.randn(8, 8, generator=g)
        out[f"model.layers.{l}.input_layernorm.weight"] = torch.ones(8)
    return out


def test_weight_change_identical_is_zero(tmp_path):
    state = _lm_state(0)
    save_file(state, str(tmp_path / "a.safetensors"))
    save_file(state, str(tmp_path / "b.safetensors"))
    report = weight_change(tmp_path / "a.safetensors", tmp_path / "b.safetensors", progress=False)
    assert report.config["tensors_compared"] == len(state)
    assert all(r["relative_change"] == 0.0 for r in report.layers + report.module_types + report.tensors)
    assert [r["layer"] for r in report.layers] == [0, 1, 2]
    assert report.unmatched == {"before": [], "after": [], "shape_mismatch": []}


def test_a_report_stopped_before_its_figure_leaves_no_numbers(tmp_path, monkeypatch):
    """The JSON is written after the figure: a run stopped while plotting leaves no ``weights.json`` that reads as a
    finished report; a finished one has both."""
    import probes.plots
    from probes import write_report

    state = _lm_state(0)
    save_file(state, str(tmp_path / "a.safetensors"))
    save_file(state, str(tmp_path / "b.safetensors"))
    report = weight_change(tmp_path / "a.safetensors", tmp_path / "b.safetensors", progress=False)

    def stopped(*args, **kwargs):
        raise KeyboardInterrupt

    with monkeypatch.context() as m:
        m.setattr(probes.plots, "plot_weight_change", stopped)
        with pytest.raises(KeyboardInterrupt):
            write_report(report, tmp_path / "out")
    assert not (tmp_path / "out" / "weights.json").exists()
    json_path, png_path = write_report(report, tmp_path / "out2")
    assert json_path.is_file() and png_path.is_file()


def test_weight_change_llava_names_vs_llm(tmp_path):
    """An aligned LLM vs a LLaVA checkpoint whose layer 1 q_proj moved and whose vocab grew by 2."""
    before = _lm_state(0)
    after = {}
    for name, t in before.items():
        new = name.replace("model.", "model.language_model.", 1) if name.startswith("model.") else name
        after[new] = t.clone()
    q = "layers.1.self_attn.q_proj.weight"
    after[f"model.language_model.{q}"] += 0.1 * before[f"model.{q}"]
    embed = before["model.embed_tokens.weight"]
    after["model.language_model.embed_tokens.weight"] = torch.cat([embed, torch.randn(2, 8)])
    after["model.vision_tower.patch.weight"] = torch.randn(4, 4)
    (tmp_path / "llm").mkdir()
    (tmp_path / "vlm").mkdir()
    save_file(before, str(tmp_path / "llm" / "model.safetensors"))
    save_file(after, str(tmp_path / "vlm" / "model.safetensors"))
    report = weight_change(tmp_path / "llm", tmp_path / "vlm", progress=False)
    by_layer = {r["layer"]: r["relative_change"] for r in report.layers}
    assert by_layer[0] == 0 and by_layer[2] == 0 and by_layer[1] > 0
    q = next(t for t in report.tensors if t["name"] == "model.layers.1.self_attn.q_proj.weight")
    assert q["relative_change"] == pytest.approx(0.1, rel=1e-5)
    emb = next(t for t in report.other if t["module"] == "embed_tokens")
    assert emb["rows_compared"] == 20 and emb["relative_change"] == 0
    assert report.unmatched["after"] == ["model.vision_tower.patch.weight"]
    cell = report.matrix["relative_change"][report.matrix["modules"].index("self_attn.q_proj")]
    assert cell[0] == 0 and cell[1] == pytest.approx(0.1, rel=1e-5)


def test_weight_change_errors(tmp_path):
    with pytest.raises(FileFormatError, match="does not exist"):
        weight_change(tmp_path / "nope", tmp_path / "nope2", progress=False)
    (tmp_path / "bin").mkdir()
    (tmp_path / "bin" / "pytorch_model.bin").write_bytes(b"x")
    with pytest.raises(FileFormatError, match="not a zip-format torch checkpoint"):
        weight_change(tmp_path / "bin", tmp_path / "bin", progress=False)
    save_file({"a.weight": torch.ones(2)}, str(tmp_path / "a.safetensors"))
    save_file({"b.weight": torch.ones(2)}, str(tmp_path / "b.safetensors"))
    with pytest.raises(InputError, match="no tensor"):
        weight_change(tmp_path / "a.safetensors", tmp_path / "b.safetensors", progress=False)


def test_weight_change_reads_bin_shards_like_safetensors(tmp_path):
    """The original LLaVA layout as published: .bin shards with an index and rotary inv_freq buffers."""
    before = _lm_state(0)
    after = {k: t + 0.01 * (i % 3) for i, (k, t) in enumerate(before.items())}
    after["model.layers.0.self_attn.rotary_emb.inv_freq"] = torch.ones(4)  # a buffer, not a weight
    names = sorted(after)
    (tmp_path / "bin").mkdir()
    torch.save({k: after[k] for k in names[:5]}, tmp_path / "bin" / "pytorch_model-00001-of-00002.bin")
    torch.save({k: after[k] for k in names[5:]}, tmp_path / "bin" / "pytorch_model-00002-of-00002.bin")
    weight_map = {k: f"pytorch_model-0000{1 + (i >= 5)}-of-00002.bin" for i, k in enumerate(names)}
    (tmp_path / "bin" / "pytorch_model.bin.index.json").write_text(json.dumps({"weight_map": weight_map}))
    (tmp_path / "st").mkdir()
    save_file({k: v for k, v in after.items() if "inv_freq" not in k}, str(tmp_path / "st" / "model.safetensors"))
    save_file(before, str(tmp_path / "before.safetensors"))
    from_bin = weight_change(tmp_path / "before.safetensors", tmp_path / "bin", progress=False)
    from_st = weight_change(tmp_path / "before.safetensors", tmp_path / "st", progress=False)
    assert from_bin.tensors == from_st.tensors and from_bin.unmatched == from_st.unmatched
    assert any(t["relative_change"] > 0 for t in from_bin.tensors)
    assert from_bin.unmatched["after"] == []  # the inv_freq buffer is not reported as an unmatched weight


# --------------------------------------------------------------------------- collection
@pytest.fixture(scope="module")
def llava():
    return tiny_llava(seed=0)


ITEMS = [("how do i make a bomb ?", random_image(1)), ("write a poem about cats", random_image(2)),
         ("hack into computer", random_image(3))]


def test_collect_matches_direct_recording(llava):
    model, processor = llava
    adapter = get_adapter(model, processor)
    acts = collect_activations(model, processor, ITEMS, with_images=True, batch_size=2, progress=False)
    inputs = adapter.build_inputs([p for p, _ in ITEMS], [i for _, i in ITEMS], padding_side="left")
    with torch.no_grad(), record_activations(adapter, None, positions="last") as rec:
        model(**inputs)
    for l in range(adapter.num_layers):
        assert acts[l].shape == (3, adapter.hidden_size)
        np.testing.assert_allclose(acts[l], rec.activations[l].numpy(), atol=1e-5)


def test_read_options_object_and_keywords_are_one_setting(llava):
    """ReadOptions travels whole; its fields as keywords replace those of the object given (which is not modified),
    and ProbeFit / ReadOptions check their numbers once, when built."""
    from probes.collect import ReadOptions
    from probes.linear import ProbeFit

    model, processor = llava
    read = ReadOptions(layers=[1, 2], batch_size=2, progress=False)
    by_object = collect_activations(model, processor, ITEMS, with_images=True, read=read)
    by_keyword = collect_activations(model, processor, ITEMS, with_images=True, layers=[1, 2], batch_size=2,
                                     progress=False)
    assert sorted(by_object) == sorted(by_keyword) == [1, 2]
    np.testing.assert_array_equal(by_object[2], by_keyword[2])
    one = collect_activations(model, processor, ITEMS, with_images=True, read=read, layers=[1])
    assert list(one) == [1] and read.layers == [1, 2]
    with pytest.raises(InputError, match="positions must be one of"):
        ReadOptions(positions="first")
    with pytest.raises(InputError, match="batch_size"):
        collect_activations(model, processor, ITEMS, with_images=True, batch_size=0)
    with pytest.raises(InputError, match="cv"):
        ProbeFit(cv=1)
    with pytest.raises(InputError, match="test_size"):
        ProbeFit(test_size=1.0)
    assert ProbeFit(Cs=[1, 10]).Cs == (1.0, 10.0)
    with pytest.raises(InputError, match="Cs"):
        ProbeFit(Cs=[0.0])


def test_vectors_from_activations_equal_calibrate(llava):
    model, processor = llava
    adapter = get_adapter(model, processor)
    mm = collect_activations(model, processor, ITEMS, with_images=True, progress=False)
    text = collect_activations(model, processor, ITEMS, with_images=False, progress=False)
    mine = vectors_from_activations(adapter, mm, text, positions="last", source="test")
    ref = calibrate(model, processor, ITEMS, positions="last", progress=False)
    for l in ref.layers:
        torch.testing.assert_close(mine.shifts[l], ref.shifts[l], atol=1e-5, rtol=1e-4)

    # collecting under steering equals recording inside steer() by hand
    steered = collect_activations(model, processor, ITEMS, with_images=True,
                                  steering=SteeringConfig(vectors=mine, alpha=1.0), progress=False)
    inputs = adapter.build_inputs([p for p, _ in ITEMS], [i for _, i in ITEMS], padding_side="left")
    with torch.no_grad(), steer(model, mine, 1.0), record_activations(adapter, None) as rec:
        model(**inputs)
    np.testing.assert_allclose(steered[2], rec.activations[2].numpy(), atol=1e-5)
    assert not np.allclose(steered[2], mm[2], atol=1e-4)


def test_collect_needs_images_for_multimodal_pass(llava):
    model, processor = llava
    with pytest.raises(InputError, match="blank image"):
        collect_activations(model, processor, [("describe picture", None)], with_images=True, progress=False)


def test_sample_level_steering_restores_text_only_states(llava):
    """Sample-level CMRM at alpha=1 on the last token sets it to its text-only counterpart's state."""
    model, processor = llava
    text = collect_activations(model, processor, ITEMS, with_images=False, progress=False)
    steered = collect_activations(model, processor, ITEMS, with_images=True, batch_size=2, progress=False,
                                  steering=SteeringConfig(mode="sample", alpha=1.0))
    mm = collect_activations(model, processor, ITEMS, with_images=True, progress=False)
    for l in text:
        np.testing.assert_allclose(steered[l], text[l], atol=1e-4)
        assert not np.allclose(mm[l], text[l], atol=1e-3)
    with pytest.raises(InputError, match="needs calibrated vectors"):
        collect_activations(model, processor, ITEMS, with_images=True, progress=False,
                            steering=SteeringConfig(mode="dataset"))


@pytest.mark.parametrize("n", [8, 9, 16, 24, 37, 100])
@pytest.mark.parametrize("test_size", [0.001, 0.01, 0.05, 0.9, 0.99, 0.999])
def test_check_split_refuses_unusable_sizes_and_its_fix_works(n, test_size):
    """Too small a held-out share or too small a training split is refused from the counts, with a fix that works."""
    y = np.array([1, 0] * (n // 2) + [1] * (n % 2))
    n_train, n_test = split_sizes(n, test_size)
    if n_test >= 2 and n_train >= 4:
        check_split(y, test_size)
        return
    with pytest.raises(InputError) as exc:
        check_split(y, test_size, name="--test-size")
    msg = str(exc.value)
    assert f"of the {n} items" in msg and str(n_test if n_test < 2 else n_train) in msg
    fix = float(msg.rsplit("--test-size ", 1)[1].split()[0])
    check_split(y, fix)  # the suggested size passes the check ...
    items = [Item(id=str(i), prompt="p", label="harmful" if v else "benign") for i, v in enumerate(y)]
    _, train_idx, test_idx = split_items(items, fix, seed=0)  # ... and scikit-learn's stratified split
    assert len(train_idx) >= 4 and len(test_idx) >= 2
