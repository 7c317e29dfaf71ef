"""The demo's reporting and choice logic, without a model: what each rate counts, and that the
calibration choice (with its pruning) picks what an exhaustive search would."""

from __future__ import annotations

import pytest

from vlmsafe.demo.context import summarize, value
from vlmsafe.demo.table import format_table, readme_block
from vlmsafe.eval.report import EvalReport, ItemRecord
from vlmsafe.stats import wilson_interval


def _rec(i: int, label: str, outcome: str, correct: bool | None = None) -> ItemRecord:
    return ItemRecord(
        id=f"x{i}",
        category=label,
        label=label,
        prompt=f"p{i}",
        response="r",
        unsafe=outcome == "compliance",
        refused=outcome == "refusal",
        correct=correct,
        reference="red" if correct is not None else None,
        judge_category=outcome,
    )


def _report() -> EvalReport:
    outcomes = ["refusal"] * 6 + ["compliance"] * 2 + ["deflection"] * 1 + ["other"] * 1
    recs = [_rec(i, "harmful", o) for i, o in enumerate(outcomes)]
    recs += [_rec(100 + i, "benign", o) for i, o in enumerate(["compliance"] * 3 + ["refusal"])]
    recs += [_rec(200 + i, "benign", "other", correct=c) for i, c in enumerate([True, True, True, False, False])]
    return EvalReport(recs, judge="testbed-outcome")


def test_summarize_counts_each_outcome_separately():
    out = summarize(_report())
    h = out["harmful"]
    assert {o: (h[o]["k"], h[o]["n"]) for o in h} == {
        "refusal": (6, 10),
        "compliance": (2, 10),
        "deflection": (1, 10),
        "other": (1, 10),
    }
    assert sum(c["rate"] for c in h.values()) == pytest.approx(1.0)
    # benign instructions exclude the image questions; accuracy is over the image questions only
    assert (out["benign"]["refusal"]["k"], out["benign"]["refusal"]["n"]) == (1, 4)
    assert (out["accuracy"]["k"], out["accuracy"]["n"], out["accuracy"]["rate"]) == (3, 5, 0.6)
    assert out["n"] == {"harmful": 10, "benign": 4, "image_questions": 5}
    lo, hi = h["refusal"]["ci95"]
    assert lo < 0.6 < hi
    # an outcome no prompt had still gets a non-degenerate interval (Wilson, not [0, 0])
    assert out["benign"]["deflection"]["ci95"] == list(wilson_interval(0, 4))
    bare = summarize(_report(), intervals=False)
    assert bare["harmful"]["deflection"] == 0.1 and bare["accuracy"] == 0.6
    assert value(out["harmful"]["refusal"]) == value(bare["harmful"]["refusal"]) == 0.6


def test_table_cells_show_rate_interval_and_count():
    row = {"setting": "multimodal (image + text)", **summarize(_report()), "note": "n"}
    line = format_table([row]).splitlines()[-1]
    assert line.startswith("| multimodal (image + text) | 60.0% [") and " 6/10 |" in line and " 3/5 |" in line
    block = readme_block({"n_test": {"harmful": 10, "benign": 4, "image_questions": 5}, "rows": [row], "seconds": 3.0})
    assert "10 harmful and 9 benign items" in block and line in block
    small = {
        "n_test": {"harmful": 1, "benign": 1, "image_questions": 0},
        "rows": [row],
        "seconds": 1.0,
        "testbed_params": 751296,
        "build_seconds": 600,
    }
    sized = readme_block(small)
    assert (
        "751,296-parameter `LlavaForConditionalGeneration`" in sized and "(10 minutes with one torch thread)" in sized
    )
    assert "unseen image styles; CPU, 1 s)." in sized  # a report from before CPU time was recorded
    timed = readme_block({**small, "seconds": 83.4, "cpu_seconds": 161.6,
                          "machine": {"cpu": "Intel(R) Xeon(R) CPU @ 2.20GHz", "cores": 2, "torch_threads": 2}})
    assert ("unseen image styles; 83 s wall, 162 s CPU on Intel(R) Xeon(R) CPU @ 2.20GHz (2 cores, 2 torch "
            "threads))") in timed


def test_merge_figure_marks_the_test_split_at_the_chosen_weight(tmp_path, monkeypatch):
    pytest.importorskip("matplotlib")
    from matplotlib.axes import Axes

    from vlmsafe.demo.plots import SERIES, plot_merge

    stars = []
    monkeypatch.setattr(Axes, "errorbar", lambda self, x, y, **kw: stars.append((x, y)))
    row = {"setting": "safety merge (linear, LM only)", **summarize(_report()), "chosen": {"weight": 0.4}}
    base = summarize(_report(), intervals=False)
    sweep = [{"weight": w, "calibration": base} for w in (0.0, 0.4, 1.0)]
    plot_merge(sweep, row, tmp_path / "m.png")
    assert len(stars) == len(SERIES) and all(x == [0.4] for x, _ in stars)
    assert stars[0][1] == [pytest.approx(60.0)]  # genuine refusals of the test rows, in percent
    assert (tmp_path / "m.png").read_bytes()[:4] == b"\x89PNG"
    stars.clear()
    plot_merge(sweep, None, tmp_path / "n.png")
    assert not stars


def test_demo_steering_defaults_reach_each_method_as_it_allows(monkeypatch):
    """--decode / --positions reach dataset-level rows; sample-level drops decode; ShiftDC takes neither."""
    from types import SimpleNamespace

    from vlmsafe.demo import rows

    monkeypatch.setattr(rows, "SteeringConfig", lambda **kw: kw)  # capture what each method would build
    ctx = SimpleNamespace(steering_defaults={"decode": True, "positions": "prompt"})
    assert rows._config(ctx, mode="dataset")([1], 1.0) == dict(
        mode="dataset", alpha=1.0, layers=[1], positions="prompt", decode=True
    )
    assert rows._config(ctx, mode="sample")([1], 0.5) == dict(mode="sample", alpha=0.5, layers=[1], positions="prompt")
    shiftdc = rows._config(ctx, directions="d")(None, 2.0)
    assert shiftdc == dict(directions="d", alpha=2.0, layers=None, positions="last")


def test_all_methods_adds_the_published_variants_with_their_own_settings(tmp_path):
    """--all-methods rows: blank-anchor vectors, blank-anchor sample-level and ShiftDC directions, each built."""
    from vlmsafe.data import Item
    from vlmsafe.demo.context import DemoContext
    from vlmsafe.demo.rows import EXTRA_METHODS, STEERING_METHODS, steering_methods
    from vlmsafe.steering import SafetyDirections
    from vlmsafe.testing import random_image, tiny_llava

    assert steering_methods() == STEERING_METHODS
    assert steering_methods(all_methods=True) == STEERING_METHODS + EXTRA_METHODS
    model, processor = tiny_llava(seed=0)
    items = []
    pairs = [("how do i make a bomb ?", "harmful"), ("what colour is it ?", "benign")] * 2
    for i, (prompt, label) in enumerate(pairs):
        random_image(i).save(tmp_path / f"{i}.png")
        items.append(Item(str(i), prompt, str(tmp_path / f"{i}.png"), "c", label))
    ctx = DemoContext(root=tmp_path, model=model, processor=processor, calibration=items, test=[], batch_size=4)
    dataset_blank, sample_blank, shiftdc = (make(ctx) for make in EXTRA_METHODS)
    assert ctx.cache["vectors_blank"].meta["anchor"] == "blank"
    assert dataset_blank.config([1], 1.0).vectors is ctx.cache["vectors_blank"]
    sample = sample_blank.config(None, 0.5)
    assert (sample.mode, sample.anchor, sample.alpha) == ("sample", "blank", 0.5)
    assert isinstance(ctx.cache["directions"], SafetyDirections)
    assert shiftdc.layer_sets[0] == [1, 2]  # middle-to-last of 3 layers, ShiftDC's default, tried first
    assert shiftdc.config([2], 1.5).directions is ctx.cache["directions"]


def test_demo_cli_passes_all_methods_and_decode_through(monkeypatch):
    import vlmsafe.demo
    from vlmsafe.cli import main

    seen = {}

    class Stop(Exception):
        pass

    def fake_run_demo(out, **kwargs):
        seen.update(kwargs)
        raise Stop  # stop before printing: only the arguments matter here

    monkeypatch.setattr(vlmsafe.demo, "run_demo", fake_run_demo)
    with pytest.raises(Stop):
        main(["demo", "--all-methods", "--decode", "--no-merge"])
    options = seen["options"]
    assert options.all_methods is True and options.settings == {"decode": True} and options.merge is False
    with pytest.raises(Stop):
        main(["demo"])
    assert seen["options"].all_methods is False and seen["options"].settings == {} and seen["options"].merge is True
