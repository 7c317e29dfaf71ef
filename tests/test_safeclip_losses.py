"""Each Safe-CLIP loss term against a hand computation on fixed tensors."""

import math

import pytest
import torch

from vlmsafe.errors import InputError
from vlmsafe.safeclip.losses import (
    ALL_LOSS_NAMES,
    LOSS_NAMES,
    SafeCLIPEmbeddings,
    SafeCLIPLossWeights,
    clip_nce,
    cosine_distance,
    safeclip_losses,
    token_drift,
)

R2 = math.sqrt(2.0)

# Two items, 2-D embeddings chosen so every cosine is a simple number.
TS = torch.tensor([[1.0, 0.0], [0.0, 1.0]])  # T(S)
TU = torch.tensor([[0.0, 1.0], [-1.0, 0.0]])  # T(U)
T0S = torch.tensor([[1.0, 0.0], [2.0, 0.0]])  # T0(S) (norm must not matter)
IV = torch.tensor([[1.0, 1.0], [0.0, 1.0]])  # I(V)
IG = torch.tensor([[-1.0, 0.0], [0.0, 3.0]])  # I(G)
I0V = torch.tensor([[1.0, 0.0], [0.0, 1.0]])  # I0(V)


def hand_nce(a_rows, b_rows, scale):
    """Symmetric InfoNCE written out with floats: mean over rows of -log softmax, both directions."""
    na = [[x / math.hypot(*r) for x in r] for r in a_rows]
    nb = [[x / math.hypot(*r) for x in r] for r in b_rows]
    n = len(na)
    logits = [[scale * sum(p * q for p, q in zip(na[i], nb[j])) for j in range(n)] for i in range(n)]
    row = sum(-logits[i][i] + math.log(sum(math.exp(v) for v in logits[i])) for i in range(n)) / n
    col = sum(-logits[j][j] + math.log(sum(math.exp(logits[i][j]) for i in range(n))) for j in range(n)) / n
    return 0.5 * (row + col)


def emb(**overrides):
    base = dict(
        text_safe=TS,
        text_nsfw=TU,
        ref_text_safe=T0S,
        image_safe=IV,
        image_nsfw=IG,
        ref_image_safe=I0V,
        has_safe_image=torch.tensor([True, True]),
        has_unsafe_image=torch.tensor([True, True]),
    )
    base.update(overrides)
    return SafeCLIPEmbeddings(**base)


def test_cosine_terms_match_hand_values():
    out = safeclip_losses(emb(), logit_scale=1.0)
    # cos(T(S), T0(S)) = 1, 0           -> d = (0 + 1) / 2
    assert out["text_safe"].item() == pytest.approx(0.5)
    # cos(T(U), T0(S)) = 0, -1          -> d = (1 + 2) / 2
    assert out["text_nsfw"].item() == pytest.approx(1.5)
    # cos(I(V), I0(V)) = 1/sqrt2, 1     -> d = (1 - 1/sqrt2 + 0) / 2
    assert out["vision_safe"].item() == pytest.approx((1 - 1 / R2) / 2)
    # cos(I(G), I0(V)) = -1, 1          -> d = (2 + 0) / 2
    assert out["vision_nsfw"].item() == pytest.approx(1.0)


@pytest.mark.parametrize("scale", [1.0, 100.0])
def test_nce_terms_match_hand_values(scale):
    out = safeclip_losses(emb(), logit_scale=scale)
    as_list = lambda t: t.tolist()
    assert out["S_Vref"].item() == pytest.approx(hand_nce(as_list(TS), as_list(I0V), scale), rel=1e-5)
    assert out["U_Vref"].item() == pytest.approx(hand_nce(as_list(TU), as_list(I0V), scale), rel=1e-5)
    assert out["V_Sref"].item() == pytest.approx(hand_nce(as_list(IV), as_list(T0S), scale), rel=1e-5)
    assert out["G_Sref"].item() == pytest.approx(hand_nce(as_list(IG), as_list(T0S), scale), rel=1e-5, abs=1e-6)


def test_identity_pair_nce_closed_form():
    # a = b = I: logits = s*I, each CE = log(1 + e^-s)
    eye = torch.eye(2)
    assert clip_nce(eye, eye, 3.0).item() == pytest.approx(math.log(1 + math.exp(-3.0)), rel=1e-6)


def test_total_is_weighted_sum_over_weight_sum():
    w = SafeCLIPLossWeights()
    out = safeclip_losses(emb(), w, logit_scale=100.0)
    manual = sum(getattr(w, n) * out[n].item() for n in LOSS_NAMES) / 1.75
    assert sum(w.as_dict().values()) == pytest.approx(1.75)
    assert out["loss"].item() == pytest.approx(manual, rel=1e-6)
    unnormalized = safeclip_losses(emb(), SafeCLIPLossWeights(normalize=False), logit_scale=100.0)
    assert unnormalized["loss"].item() == pytest.approx(manual * 1.75, rel=1e-6)


def test_missing_images_use_only_rows_that_have_them():
    # item 1 has no unsafe image; item 0 has no safe image
    out = safeclip_losses(
        emb(has_safe_image=torch.tensor([False, True]), has_unsafe_image=torch.tensor([True, False])), logit_scale=1.0
    )
    assert out["vision_safe"].item() == pytest.approx(0.0)  # only row 1: cos = 1
    assert out["vision_nsfw"].item() == 0.0  # needs V and G: no row has both
    assert out["S_Vref"].item() == pytest.approx(hand_nce([[0.0, 1.0]], [[0.0, 1.0]], 1.0))  # one row: log(1) = 0
    assert out["G_Sref"].item() == pytest.approx(0.0)  # one row
    assert out["text_safe"].item() == pytest.approx(0.5)  # text terms use every row


def test_text_only_batch_trains_text_terms_only():
    out = safeclip_losses(
        SafeCLIPEmbeddings(ref_text_safe=T0S, text_safe=TS.requires_grad_(), text_nsfw=TU), logit_scale=100.0
    )
    for name in ("vision_safe", "vision_nsfw", "S_Vref", "U_Vref", "V_Sref", "G_Sref"):
        assert out[name].item() == 0.0
    assert out["loss"].item() == pytest.approx((0.1 * 0.5 + 0.1 * 1.5) / 1.75)
    out["loss"].backward()
    assert TS.grad is not None and TS.grad.abs().sum() > 0
    TS.requires_grad_(False)
    TS.grad = None


def test_zero_weight_terms_are_reported_but_detached():
    w = SafeCLIPLossWeights(S_Vref=0.0, U_Vref=0.0, V_Sref=0.0, G_Sref=0.0)
    a = TS.clone().requires_grad_()
    out = safeclip_losses(emb(text_safe=a), w)
    assert not out["V_Sref"].requires_grad and out["V_Sref"].item() > 0
    assert out["loss"].item() == pytest.approx((0.1 * 0.5 + 0.1 * 1.5 + 0.1 * (1 - 1 / R2) / 2 + 0.2 * 1.0) / 0.5)


# --------------------------------------------------------------------------- the token-state term (ninth)
# Two captions, three positions, 2-D token states; reference norms differ per token (the normalisation must use
# each token's own reference norm).
H0 = torch.tensor([[[1.0, 0.0], [0.0, 2.0], [3.0, 4.0]], [[2.0, 0.0], [0.0, 1.0], [1.0, 0.0]]])
H = torch.tensor([[[1.0, 1.0], [0.0, 1.0], [3.0, 4.0]], [[0.0, 0.0], [1.0, 1.0], [1.0, 0.0]]])
# row 0: ||(0,1)||^2/1 = 1, ||(0,-1)||^2/4 = 0.25, 0/25 = 0        -> mean 1.25/3
# row 1: ||(-2,0)||^2/4 = 1, ||(1,0)||^2/1 = 1, 0                  -> mean 2/3
DRIFT = [1.25 / 3, 2.0 / 3]


def test_token_drift_matches_hand_values():
    assert token_drift(H, H0).tolist() == pytest.approx(DRIFT)
    assert token_drift(H0, H0).tolist() == [0.0, 0.0]
    # scale-free: the same relative change of bigger states gives the same value
    assert token_drift(10 * H, 10 * H0).tolist() == pytest.approx(DRIFT)
    with pytest.raises(InputError, match="same padding"):
        token_drift(H[:, :2], H0)


def test_token_term_enters_the_total_with_its_weight():
    drift = token_drift(H, H0)
    w = SafeCLIPLossWeights(text_safe_tokens=0.5)
    out = safeclip_losses(emb(text_safe_token_drift=drift), w, logit_scale=100.0)
    assert out["text_safe_tokens"].item() == pytest.approx(sum(DRIFT) / 2)
    eight = sum(getattr(w, n) * out[n].item() for n in LOSS_NAMES)
    assert w.denominator == pytest.approx(1.75 + 0.5)
    assert out["loss"].item() == pytest.approx((eight + 0.5 * sum(DRIFT) / 2) / 2.25, rel=1e-6)
    ref = safeclip_losses(emb(text_safe_token_drift=drift), w, logit_scale=100.0, loss_scale="reference")
    assert ref["loss"].item() == pytest.approx(out["loss"].item() / 8, rel=1e-6)  # the paper's 8, not 9
    # the gradient reaches the token states through the per-row drift
    states = H.clone().requires_grad_()
    safeclip_losses(emb(text_safe_token_drift=token_drift(states, H0)), w)["loss"].backward()
    assert states.grad is not None and states.grad[:, 2].abs().sum() == 0 and states.grad[:, :2].abs().sum() > 0


def test_token_weight_zero_is_the_papers_loss_exactly():
    w = SafeCLIPLossWeights()
    assert w.text_safe_tokens == 0.0 and not w.keeps_token_states and set(w.as_dict()) == set(ALL_LOSS_NAMES)
    with_drift = safeclip_losses(emb(text_safe_token_drift=token_drift(H, H0)), w, logit_scale=100.0)
    without = safeclip_losses(emb(), w, logit_scale=100.0)
    assert torch.equal(with_drift["loss"], without["loss"])
    assert without["text_safe_tokens"].item() == 0.0 and not with_drift["text_safe_tokens"].requires_grad
    manual = sum(getattr(w, n) * without[n].item() for n in LOSS_NAMES) / 1.75
    assert without["loss"].item() == pytest.approx(manual, rel=1e-6)
    with pytest.raises(InputError, match="loss weight text_safe_tokens"):
        SafeCLIPLossWeights(text_safe_tokens=float("nan"))
    only_tokens = SafeCLIPLossWeights(**dict.fromkeys(LOSS_NAMES, 0.0), text_safe_tokens=1.0)
    assert only_tokens.denominator == 1.0  # a token-only weighting is valid: not "all weights are 0"


def test_cosine_distance_empty_is_zero():
    assert cosine_distance(torch.zeros(0, 3), torch.zeros(0, 3)).item() == 0.0


def test_bad_weights_and_shapes_raise_clear_errors():
    with pytest.raises(InputError, match=r"must be in \[0, 1000\], got -1"):
        SafeCLIPLossWeights(text_safe=-1)
    with pytest.raises(InputError, match=r"must be in \[0, 1000\], got 1e\+300"):  # would overflow the float32 loss
        SafeCLIPLossWeights(G_Sref=1e300)
    with pytest.raises(InputError, match="normalize must be true or false"):
        SafeCLIPLossWeights(normalize="false")
    with pytest.raises(InputError, match="unknown"):
        SafeCLIPLossWeights.from_dict({"txt_safe": 1.0})
    with pytest.raises(InputError, match="rows"):
        safeclip_losses(emb(text_nsfw=torch.zeros(3, 2)))
    with pytest.raises(InputError, match="text_safe_token_drift has 3 rows"):
        safeclip_losses(emb(text_safe_token_drift=torch.zeros(3)))


def naive_terms(e: SafeCLIPEmbeddings, scale: float) -> dict:
    """Each term on its own with the public clip_nce / cosine_distance (the pre-fusion computation)."""
    v = e.has_safe_image if e.ref_image_safe is not None else torch.zeros_like(e.has_safe_image)
    g = e.has_unsafe_image
    return {
        "text_safe": cosine_distance(e.text_safe, e.ref_text_safe),
        "text_nsfw": cosine_distance(e.text_nsfw, e.ref_text_safe),
        "vision_safe": cosine_distance(e.image_safe[v], e.ref_image_safe[v]),
        "vision_nsfw": cosine_distance(e.image_nsfw[v & g], e.ref_image_safe[v & g]),
        "S_Vref": clip_nce(e.text_safe[v], e.ref_image_safe[v], scale),
        "U_Vref": clip_nce(e.text_nsfw[v], e.ref_image_safe[v], scale),
        "V_Sref": clip_nce(e.image_safe[v], e.ref_text_safe[v], scale),
        "G_Sref": clip_nce(e.image_nsfw[g], e.ref_text_safe[g], scale),
    }


@pytest.mark.parametrize("masks", ["all", "ragged", "none_g"])
def test_fused_terms_and_gradients_equal_the_separate_computations(masks):
    torch.manual_seed(0)
    n, d = 6, 5
    has_v = {"all": [1] * 6, "ragged": [1, 0, 1, 1, 0, 1], "none_g": [1, 1, 0, 1, 1, 1]}[masks]
    has_g = {"all": [1] * 6, "ragged": [1, 1, 0, 1, 0, 0], "none_g": [0] * 6}[masks]
    leaves = {
        k: torch.randn(n, d, dtype=torch.float64, requires_grad=True)
        for k in ("text_safe", "text_nsfw", "image_safe", "image_nsfw")
    }
    e = SafeCLIPEmbeddings(
        ref_text_safe=torch.randn(n, d),
        ref_image_safe=torch.randn(n, d),
        has_safe_image=torch.tensor(has_v, dtype=torch.bool),
        has_unsafe_image=torch.tensor(has_g, dtype=torch.bool),
        **leaves,
    )
    weights = SafeCLIPLossWeights()
    fused = safeclip_losses(e, weights, logit_scale=30.0)
    naive = naive_terms(e, 30.0)
    for name in LOSS_NAMES:
        assert fused[name].item() == pytest.approx(naive[name].item(), rel=1e-5, abs=1e-6), name
    want = sum(getattr(weights, k) * naive[k] for k in LOSS_NAMES) / weights.denominator
    got_grads = torch.autograd.grad(fused["loss"], list(leaves.values()), allow_unused=True)
    want_grads = torch.autograd.grad(want, list(leaves.values()), allow_unused=True)
    for a, b in zip(got_grads, want_grads):
        assert (a is None) == (b is None)
        assert a is None or torch.allclose(a.double(), b.double(), rtol=1e-4, atol=1e-6)
    assert (fused["G_Sref"].item() == 0.0) == (masks == "none_g")
