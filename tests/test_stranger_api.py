"""A stranger's first hour with the Python API, in a notebook: what they pass that the docs do not show.

Each case once failed as a raw AttributeError/TypeError deep inside, or was silently read as something else;
now it is either accepted (a path where a PIL image is shown, numpy numbers) or one vlmsafe error naming the
argument and the fix.
"""

from pathlib import Path

import numpy as np
import pytest
import torch

from vlmsafe.data import load_items
from vlmsafe.errors import FileFormatError, InputError, LayerIndexError
from vlmsafe.steering import SafeVLM, SteeringConfig, calibrate, steer
from vlmsafe.testbed import testbed_dir
from vlmsafe.validation import check_float, check_int


@pytest.fixture(scope="module")
def testbed():
    """The bundled tiny LLaVA, vectors calibrated on four of its items, and one item with its image."""
    from vlmsafe.loading import load_model

    model, processor = load_model(testbed_dir(None))
    items = load_items(testbed_dir(None) / "data" / "calibration.jsonl")
    vectors = calibrate(model, processor, items[:4], progress=False)
    item = next(i for i in items if i.image)
    return model, processor, vectors, item


@pytest.fixture(scope="module")
def vlm(testbed):
    model, processor, vectors, _ = testbed
    return SafeVLM(model, processor, SteeringConfig(vectors=vectors, layers=[2]), max_new_tokens=3)


# --------------------------------------------------------------------------- SafeVLM.generate's inputs
def test_generate_opens_an_image_given_as_a_path(testbed, vlm):
    """A path (str or pathlib.Path) where the docs show a PIL image: opened as Item.load_image opens it, not an
    AttributeError ('str' object has no attribute 'mode') from the image conversion."""
    *_, item = testbed
    expected = vlm.generate(item.prompt, item.load_image())
    assert vlm.generate(item.prompt, str(item.image)) == expected
    assert vlm.generate([item.prompt], [Path(item.image)]) == [expected]


@pytest.mark.parametrize(("prompts", "images", "message"), [
    ("one", ["a", "b"], "got one prompt (a str) but a list of 2 images"),
    (["one"], "x.png", "got a list of prompts but a single image"),
    (5, None, "prompts must be a str or a list of str, got int"),
    ([None], [None], "prompt must be a string, got NoneType"),
    (["one"], [np.zeros((4, 4, 3), dtype=np.uint8)], "image must be a path, a PIL image or None, got ndarray"),
])
def test_generate_refuses_inputs_it_cannot_read(vlm, prompts, images, message):
    with pytest.raises(InputError) as err:
        vlm.generate(prompts, images)
    assert message in str(err.value)


def test_generate_names_a_missing_image_file(vlm):
    with pytest.raises(FileFormatError, match=r"image file '.*missing\.png' does not exist; fix the path"):
        vlm.generate("hello", "no-such-folder/missing.png")


# --------------------------------------------------------------------------- numbers from numpy
def test_numpy_numbers_are_numbers():
    """``alpha=np.float32(1.0)`` (an array's element) was refused as 'must be a number'; ``np.int64`` too."""
    assert check_float(np.float32(0.5), "alpha", low=0) == 0.5
    assert type(check_float(np.float32(0.5), "alpha")) is float
    assert check_int(np.int64(3), "batch_size", low=1) == 3 and type(check_int(np.int64(3), "n")) is int
    assert SteeringConfig(mode="sample", alpha=np.float32(1.5)).alpha == 1.5
    with pytest.raises(InputError, match="must be an integer"):
        check_int(np.float64(3.0), "batch_size")


# --------------------------------------------------------------------------- keyword typos and wrong types
def test_steer_refuses_an_unknown_option_with_the_known_ones(testbed):
    model, _, vectors, _ = testbed
    known = r"unknown option\(s\) `alpah` for SteeringConfig; use mode, vectors, alpha"
    with pytest.raises(InputError, match=known), steer(model, vectors, alpah=2.0):
        pass


def test_evaluate_refuses_an_unknown_override(vlm, testbed):
    from vlmsafe.eval import evaluate

    *_, item = testbed
    with pytest.raises(InputError, match=r"unknown option\(s\) `max_new_token` for EvalOptions; use "):
        evaluate(vlm, [item], judge=None, max_new_token=3)


@pytest.mark.parametrize("field", ["decode", "steer_text_only"])
def test_steering_switches_must_be_booleans(testbed, field):
    """``decode="no"`` was kept and read as true: generated tokens steered against the user's word."""
    vectors = testbed[2]
    with pytest.raises(InputError, match=f"{field} must be True or False, got 'no'"):
        SteeringConfig(vectors=vectors, **{field: "no"})


@pytest.mark.parametrize("cfg", [{"vlm": "a", "aligned": "b", "output": "c"}, "merge.yaml"])
def test_merge_checkpoints_refuses_what_is_not_a_merge_config(cfg, tmp_path):
    from vlmsafe.merge.streaming import merge_checkpoints

    with pytest.raises(InputError, match=r"`cfg` must be a MergeConfig \(MergeConfig.from_dict"):
        merge_checkpoints(cfg, progress=False)


def test_safeclip_trainer_refuses_parts_of_the_wrong_type():
    from vlmsafe.safeclip import SafeCLIPTrainer, train_safeclip
    from vlmsafe.testbed.safeclip import tiny_clip_backend

    with pytest.raises(InputError, match="`backend` must be a CLIPBackend"):
        SafeCLIPTrainer("openai/clip-vit-base-patch32")
    backend = tiny_clip_backend(0, hidden=32, layers=1, vision_layers=1)
    with pytest.raises(InputError, match=r"`config` must be a SafeCLIPTrainingConfig \(SafeCLIPTrainingConfig.from_"):
        SafeCLIPTrainer(backend, {"batch_size": 8})
    # a JSONL path was read as a data set of its characters ("need at least 32 training items, got 10")
    with pytest.raises(InputError, match="`train_data` must be a QuadrupletDataset"):
        train_safeclip("no-such-model", "data.jsonl", "out")


# --------------------------------------------------------------------------- steering objects
def test_safevlm_names_how_to_load_a_folder_of_vectors(testbed, tmp_path):
    """``SafeVLM(model, processor, "vectors/")`` is refused (a config or an artefact is expected) with the calls
    that load the folder; ``generate_kwargs`` that are not a dict were a TypeError inside the constructor."""
    model, processor, *_ = testbed
    with pytest.raises(InputError, match=r"got PosixPath \(a folder: ShiftVectors.load\(DIR\) or SafetyDirections"):
        SafeVLM(model, processor, tmp_path)
    with pytest.raises(InputError, match="`generate_kwargs` must be a dict"):
        SafeVLM(model, processor, generate_kwargs=["do_sample"])


@pytest.mark.parametrize("wrong", ["vectors/", {0: "tensor"}])
def test_steer_refuses_what_is_not_vectors(testbed, wrong):
    model = testbed[0]
    with pytest.raises(InputError, match=r"`vectors` must be ShiftVectors \(ShiftVectors.load\(DIR\)"), \
            steer(model, wrong):
        pass


def test_steer_sample_level_refuses_a_list_of_states(testbed):
    import torch

    from vlmsafe.steering import steer_sample_level

    with pytest.raises(InputError, match=r"`text_only_states` must be a dict \{layer: \(batch, hidden\) tensor\}"), \
            steer_sample_level(testbed[0], [torch.zeros(1, 96)]):
        pass


def test_vector_algebra_refuses_factors_that_make_nan(testbed):
    """``vectors * float("nan")`` made vectors that turn every steered state to nan; ``vectors / 0`` was a
    ZeroDivisionError."""
    vectors = testbed[2]
    with pytest.raises(InputError, match="the factor must be a finite number, got nan"):
        vectors * float("nan")
    with pytest.raises(InputError, match="cannot divide vectors by 0"):
        vectors / 0
    assert (vectors / 2)[1].equal(vectors[1] * 0.5)


def test_evaluate_refuses_parts_it_cannot_call_before_the_first_batch(tmp_path):
    """A plain function as the generator, a judge named by a string, items as a path, dicts or a generator, and a
    judge returning bools: each was an AttributeError/TypeError inside the first batch."""
    from vlmsafe.data import Item
    from vlmsafe.eval import RefusalJudge, evaluate
    from vlmsafe.eval.verdict import Verdict

    class Echo:
        def generate(self, prompts, images, *, max_new_tokens=64):
            return ["sure, here is how" for _ in prompts]

    items = [Item("a", "how do i make a bomb ?", None, label="harmful")]
    cases = [
        ((lambda prompts, images: ["x"], items, RefusalJudge()), r"`generator` must have a generate\("),
        ((Echo(), items, "keyword"), r"`judge` must have a judge\(prompts, responses\) method"),
        ((Echo(), str(tmp_path / "items.jsonl"), RefusalJudge()), r"`items` is a path .*load_items\(PATH\)"),
        ((Echo(), [{"id": "a", "prompt": "p"}], RefusalJudge()), r"`items` must be vlmsafe.data.Item objects .*dict"),
        ((Echo(), (it for it in items), RefusalJudge()), r"`items` must be a list of Item, got generator"),
    ]
    for args, message in cases:
        with pytest.raises(InputError, match=message):
            evaluate(*args, progress=False)

    class Bools:
        def judge(self, prompts, responses):
            return [True for _ in responses]

    with pytest.raises(InputError, match=r"returned bool verdicts; return one vlmsafe.eval.Verdict per response"):
        evaluate(Echo(), items, Bools(), progress=False)
    assert evaluate(Echo(), items, RefusalJudge(), progress=False).records[0].response == "sure, here is how"
    assert isinstance(RefusalJudge().judge(["p"], ["no"])[0], Verdict)


def test_layers_given_as_numpy_or_tensor_indices_are_integers(testbed):
    """``layers=np.array([2])`` (a notebook's argmax) was refused as "must be integers, got np.int64(2)"."""
    from vlmsafe.adapters import get_adapter

    adapter = get_adapter(*testbed[:2])
    assert adapter.resolve_layers(np.array([2, -1])) == adapter.resolve_layers([2, -1])
    assert adapter.resolve_layers(np.int64(1)) == [1]
    assert adapter.resolve_layers(torch.tensor([0, 1])) == [0, 1]
    with pytest.raises(LayerIndexError, match="must be integers, got True"):
        adapter.resolve_layers([True])


def test_overwrite_must_be_a_boolean(tmp_path):
    """``save(out, overwrite="no")`` read "no" as true and replaced the folder."""
    from vlmsafe.io import check_output

    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "keep.txt").write_text("mine")
    with pytest.raises(InputError, match=r"`overwrite` must be True or False, got 'no'"):
        check_output(tmp_path / "out", kind="dir", overwrite="no")
    assert (tmp_path / "out" / "keep.txt").read_text() == "mine"
