"""Merge methods on small tensors: hand-computed results, and equality with peft / mergekit."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from vlmsafe.errors import InputError
from vlmsafe.merge import methods as M
from vlmsafe.merge.localise import topk_mask
from vlmsafe.merge.schedule import Schedule, layer_index

T = torch.tensor


def close(a: torch.Tensor, b, atol: float = 1e-6) -> bool:
    return torch.allclose(a.double(), torch.as_tensor(b).double(), atol=atol, rtol=0)


# -- hand-computed ---------------------------------------------------------------------------


def test_linear_is_the_llava_recipe():
    vlm, aligned = T([1.0, 2.0]), T([3.0, 6.0])
    # lam * LLM + (1 - lam) * LLM_in_LLaVA with lam = 0.25
    assert close(M.merge_pair("linear", vlm, aligned, weight=0.25), [1.5, 3.0])
    assert close(M.linear([vlm, aligned], [1.0, 3.0]), [2.5, 5.0])  # normalised by the weight sum
    assert close(M.linear([vlm, aligned], [1.0, 3.0], normalize=False), [10.0, 20.0])
    half = M.merge_pair("linear", vlm.half(), aligned.half(), weight=0.25)
    assert half.dtype == torch.float32  # computed in float32, the caller casts


def test_slerp_hand_values():
    v0, v1 = T([1.0, 0.0]), T([0.0, 1.0])
    assert close(M.slerp(v0, v1, 0.5), [math.sqrt(0.5), math.sqrt(0.5)])
    assert close(M.slerp(v0, v1, 1 / 3), [math.cos(math.pi / 6), math.sin(math.pi / 6)])
    # norms interpolate along with the angle: |2*v1| at t=1
    assert close(M.slerp(v0, 2 * v1, 1.0), [0.0, 2.0])
    # collinear inputs fall back to linear interpolation
    assert close(M.slerp(T([1.0, 1.0]), T([2.0, 2.0]), 0.5), [1.5, 1.5])


def test_task_arithmetic_hand_values():
    base = T([1.0, 1.0, 1.0])
    out = M.task_arithmetic(base, [T([2.0, 3.0, 4.0]), T([0.0, 2.0, 1.0])], [0.5, 1.0])
    # 1 + 0.5 * [1, 2, 3] + 1 * [-1, 1, 0]
    assert close(out, [0.5, 3.0, 2.5])


def test_ties_hand_values_both_conventions():
    base = torch.zeros(4)
    t1, t2 = T([1.0, -2.0, 0.1, 4.0]), T([-3.0, -0.5, 0.2, 1.0])
    # density 0.5 keeps 2 of 4: t1 -> [0,-2,0,4], t2 -> [-3,0,0,1]; elected sign [-,-,+,+]
    assert close(M.ties(base, [t1, t2], [1.0, 1.0], 0.5), [-3.0, -2.0, 0.0, 2.5])
    assert close(M.ties(base, [t1, t2], [1.0, 1.0], 0.5, convention="peft"), [-3.0, -2.0, 0.0, 2.5])
    # weights 2, 1: mergekit divides by the agreeing weights, peft by their count
    assert close(M.ties(base, [t1, t2], [2.0, 1.0], 0.5), [-3.0, -2.0, 0.0, 3.0])
    assert close(M.ties(base, [t1, t2], [2.0, 1.0], 0.5, convention="peft"), [-3.0, -4.0, 0.0, 4.5])
    assert close(M.ties(base, [t1, t2], [2.0, 1.0], 0.5, normalize=False), [-3.0, -4.0, 0.0, 9.0])


def test_ties_sign_election_weighted_vs_unweighted():
    base = torch.zeros(1)
    # unweighted sum 1 - 2 < 0 elects "-"; weighted 3*1 - 2 > 0 elects "+"
    assert close(M.ties(base, [T([1.0]), T([-2.0])], [3.0, 1.0], 1.0), [1.0])
    assert close(M.ties(base, [T([1.0]), T([-2.0])], [3.0, 1.0], 1.0, convention="peft"), [-2.0])


@pytest.mark.parametrize("convention", ["mergekit", "peft"])
def test_dare_drops_and_rescales(convention):
    base = torch.zeros(2000)
    delta = torch.linspace(0.5, 1.5, 2000)
    out = M.dare_linear(base, [delta], [1.0], 0.5, convention=convention, seed=3)
    kept = out != 0
    assert 0.45 < kept.float().mean() < 0.55
    if convention == "peft":  # kept entries scaled by 1 / density
        assert close(out[kept], delta[kept] * 2)
    else:  # rescaled so the L1 norm is preserved
        assert close(out.abs().sum(), delta.abs().sum(), atol=1e-2)
        ratio = out[kept] / delta[kept]
        assert close(ratio, torch.full_like(ratio, float(ratio[0])), atol=1e-5)
    again = M.dare_linear(base, [delta], [1.0], 0.5, convention=convention, seed=3)
    assert torch.equal(out, again)  # seeded: reproducible
    state = torch.get_rng_state()
    M.dare_ties(base, [delta], [1.0], 0.5, convention=convention, seed=4)
    assert torch.equal(state, torch.get_rng_state())  # and the global RNG is untouched


@pytest.mark.parametrize("method", M.METHODS)
def test_every_method_reduces_to_linear_at_density_one(method):
    torch.manual_seed(0)
    vlm, aligned = torch.randn(6, 5), torch.randn(6, 5)
    lin = M.merge_pair("linear", vlm, aligned, weight=0.3)
    out = M.merge_pair(method, vlm, aligned, weight=0.3, density=1.0)
    if method == "slerp":
        assert not torch.allclose(out, lin) and close(M.merge_pair(method, vlm, aligned, weight=0.0), vlm)
    else:
        assert close(out, lin, atol=1e-5)
    assert close(M.merge_pair(method, vlm, aligned, weight=1.0), aligned, atol=1e-5)


def test_merge_pair_with_separate_base():
    base, vlm, aligned = T([0.0, 0.0]), T([1.0, -1.0]), T([3.0, 1.0])
    # task vectors vlm-base (weight 0.5) and aligned-base (weight 0.5), TIES normalised by weights
    assert close(M.merge_pair("ties", vlm, aligned, base=base, weight=0.5), [2.0, 1.0])
    assert close(M.merge_pair("task_arithmetic", vlm, aligned, base=base, weight=0.5), [2.0, 0.0])


def test_apply_mask_bool_float_and_broadcast():
    orig, merged = T([[0.0, 0.0], [0.0, 0.0]]), T([[1.0, 2.0], [3.0, 4.0]])
    assert close(M.apply_mask(orig, merged, T([[True, False], [False, True]])), [[1.0, 0.0], [0.0, 4.0]])
    assert close(M.apply_mask(orig, merged, T([[0.5], [1.0]])), [[0.5, 1.0], [3.0, 4.0]])
    with pytest.raises(InputError, match="does not broadcast"):
        M.apply_mask(orig, merged, torch.ones(3))
    for bad in (float("nan"), float("inf"), -0.5, 5.0):  # NaN weights, or an extrapolation past the merge
        with pytest.raises(InputError, match=f"finite and in \\[0, 1\\].*found {bad}"):
            M.apply_mask(orig, merged, T([[0.5], [bad]]))


def test_pair_method_carries_the_global_settings():
    """A PairMethod (method, convention, normalize) is what a name means with mergekit's defaults; its convention
    and normalisation reach TIES, and a bad one is refused when the object is built."""
    vlm, aligned, base = T([3.0, -1.0, 2.0]), T([1.0, 1.0, 1.0]), T([0.0, 0.0, 0.0])
    assert close(M.merge_pair(M.PairMethod("ties"), vlm, aligned, base=base, weight=0.5),
                 M.merge_pair("ties", vlm, aligned, base=base, weight=0.5))
    plain = M.merge_pair(M.PairMethod("ties", normalize=False), vlm, aligned, base=base, weight=0.5)
    assert close(plain, M.ties(base, [vlm, aligned], [0.5, 0.5], 1.0, normalize=False))
    peft = M.merge_pair(M.PairMethod("ties", convention="peft"), vlm, aligned, base=base, weight=0.5, density=0.5)
    assert close(peft, M.ties(base, [vlm, aligned], [0.5, 0.5], 0.5, convention="peft"))
    with pytest.raises(InputError, match="unknown convention"):
        M.PairMethod("ties", convention="other")  # type: ignore[arg-type]
    with pytest.raises(InputError, match="unknown merge method"):
        M.PairMethod("average")


def test_bad_inputs_raise_clear_errors():
    with pytest.raises(InputError, match="unknown merge method"):
        M.merge_pair("average", T([1.0]), T([1.0]), weight=0.5)
    with pytest.raises(InputError, match="density"):
        M.ties(T([0.0]), [T([1.0])], [1.0], 1.5)
    with pytest.raises(InputError, match="one weight per input"):
        M.linear([T([1.0]), T([2.0])], [1.0])


# -- peft / mergekit equality ------------------------------------------------------------------


def _inputs(seed=0, shape=(8, 16)):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(shape, generator=g) for _ in range(3)]


def test_magnitude_prune_matches_peft():
    from peft.utils.merge_utils import prune

    (x, _, _) = _inputs()
    assert torch.equal(M.magnitude_prune(x, 0.3), prune(x, 0.3, method="magnitude"))


def test_mergekit_convention_ties_matches_peft_with_unit_weights():
    # with all weights 1 the two conventions coincide: an independent check of our TIES
    from peft.utils.merge_utils import ties as peft_ties

    base, t1, t2 = _inputs(1)
    ours = M.ties(base, [t1, t2], [1.0, 1.0], 0.4)
    ref = base + peft_ties([t1 - base, t2 - base], torch.ones(2), 0.4)
    assert close(ours, ref)


MERGEKIT = Path(__file__).resolve().parent / "fixtures" / "merge_mergekit"


def _mergekit_cases() -> list[tuple[str, dict]]:
    from safetensors import safe_open

    with safe_open(str(MERGEKIT / "expected.safetensors"), "pt") as f:
        return [(c["name"], c) for c in json.loads(f.metadata()["cases"])]


def _stored(name: str) -> dict[str, torch.Tensor]:
    from safetensors import safe_open

    with safe_open(str(MERGEKIT / "expected.safetensors"), "pt") as f:
        return {k.split("/", 1)[1]: f.get_tensor(k) for k in list(f.keys()) if k.startswith(name + "/")}


def _ours(case: dict, xs: list[torch.Tensor]) -> torch.Tensor:
    p, method = case["parameters"], case["method"]
    if method == "linear":
        return M.linear(xs, p["weight"])
    if method == "slerp":
        return M.slerp(xs[0], xs[1], p["t"])
    base, rest = xs[0], xs[1:]
    if method == "task_arithmetic":
        return M.task_arithmetic(base, rest, p["weight"])
    kwargs = {"seed": case["seed"]} if case["seed"] is not None else {}
    return getattr(M, method)(base, rest, p["weight"], p["density"], **kwargs)


@pytest.mark.parametrize(("name", "case"), _mergekit_cases(), ids=[n for n, _ in _mergekit_cases()])
def test_methods_match_stored_mergekit_outputs(name, case):
    """vlmsafe (mergekit convention) equals what mergekit 0.1.5 computed on the same inputs (stored fixture)."""
    data = _stored(name)
    xs = [data[f"in{i}"] for i in range(case["inputs"])]
    expected = data["expected"]
    assert close(_ours(case, xs), expected)
    assert not close(expected, xs[0], atol=1e-3)  # a real merge, not an input passed through


def test_stored_mergekit_outputs_are_current():
    """Where mergekit is installed, the stored outputs are what it computes now (regenerate them otherwise)."""
    pytest.importorskip("mergekit", reason="mergekit==0.1.5 not installed (optional: pip install mergekit==0.1.5)")
    import importlib.util

    spec = importlib.util.spec_from_file_location("make_fixtures", MERGEKIT / "make_fixtures.py")
    make = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(make)
    fresh = make.mergekit_outputs()
    for name, _ in _mergekit_cases():
        assert close(fresh[f"{name}/expected"], _stored(name)["expected"], atol=1e-7), name


# -- schedules and masks -----------------------------------------------------------------------


def test_schedule_rules_layers_and_interpolation():
    s = Schedule.parse({"default": 0.5, "layers": [0.0, 1.0], "rules": [{"pattern": r"norm", "value": 0.9}]})
    name = "model.language_model.layers.{}.mlp.up_proj.weight"
    assert s.value(name.format(0), 0, 5) == 0.0
    assert s.value(name.format(2), 2, 5) == pytest.approx(0.5)  # interpolated anchors
    assert s.value(name.format(4), 4, 5) == 1.0
    assert s.value("model.language_model.layers.1.input_layernorm.weight", 1, 5) == 0.9  # rule wins
    assert s.value("model.multi_modal_projector.linear_1.weight", None, 5) == 0.5
    assert Schedule.parse([0.1, 0.2, 0.3]).value(name.format(1), 1, 3) == 0.2  # one value per layer
    assert Schedule.parse(0.4).to_json() == 0.4
    assert layer_index("model.layers.12.self_attn.q_proj.weight") == 12
    assert layer_index("model.vision_tower.encoder.layers.3.fc1.weight") is None
    with pytest.raises(InputError, match="unknown keys"):
        Schedule.parse({"defualt": 0.3})
    with pytest.raises(InputError, match="bad regex"):
        Schedule.parse({"default": 0.3, "rules": [{"pattern": "(", "value": 1}]})


def test_topk_mask_row_and_tensor_scope():
    s = T([[1.0, 5.0, 3.0, 2.0], [9.0, 0.0, 8.0, 7.0]])
    assert topk_mask(s, 0.5, scope="row").tolist() == [[False, True, True, False], [True, False, True, False]]
    assert topk_mask(s, 0.25, scope="tensor").tolist() == [[False, False, False, False], [True, False, True, False]]
    assert topk_mask(s, 0.0).sum() == 0
