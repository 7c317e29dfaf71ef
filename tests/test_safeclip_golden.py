"""The Safe-CLIP trainer gives bit-identical numbers and weights before and after its redesign.

The golden values below were computed by the trainer before it was composed of a ``TrainState``, a
``Checkpointer``, an ``Evaluator`` and a ``TrainingLoop`` (main at 4127045, the mixins ``TrainingLoopMixin``,
``EvaluationMixin``, ``CheckpointMixin``), on one torch thread: a tiny HF CLIP from config, LoRA with dropout
(the RNG matters), gradient accumulation with a cut mid-epoch, a validation after every epoch and at the cut,
a checkpoint, and a resume to the end. ``tests/fixtures/safeclip_checkpoint`` is the output folder that code
wrote at the cut (``checkpoint-0000003`` and ``best``): a checkpoint of the old code must resume under the new.

Regenerate (only when a change of the numbers is intended): ``python tests/test_safeclip_golden.py``.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import pytest
import torch

pytestmark = pytest.mark.usefixtures("one_thread")  # Safe-CLIP results are bit-exact on one thread

FIXTURE = Path(__file__).parent / "fixtures" / "safeclip_checkpoint"
CUT = "checkpoint-0000003"


def golden_data():
    from vlmsafe.testbed.safeclip import make_splits, quadruplets, render_split

    splits = make_splits(0)
    return (quadruplets(*render_split(splits["train"][:16], 1, 0)),
            quadruplets(*render_split(splits["val"][:8], 1, 1)))


def golden_config(**kw):
    from vlmsafe.safeclip import SafeCLIPTrainingConfig

    base = dict(batch_size=4, gradient_accumulation_steps=2, num_epochs=3, lora_r=4, lora_alpha=8, lora_dropout=0.1,
                learning_rate=1e-2, eval_batch_size=4, progress=False, early_stopping_patience=None,
                keep_checkpoints=5)
    return SafeCLIPTrainingConfig(**{**base, **kw})


def golden_trainer(data, val, out, **kw):
    from vlmsafe.safeclip import SafeCLIPTrainer
    from vlmsafe.testbed.safeclip import tiny_clip_backend

    return SafeCLIPTrainer(tiny_clip_backend(0, hidden=32, layers=1, vision_layers=1), golden_config(**kw), data, val,
                           output_dir=out)


def weights_hash(state: dict[str, torch.Tensor]) -> str:
    h = hashlib.sha256()
    for name in sorted(state):
        h.update(name.encode())
        h.update(state[name].contiguous().numpy().tobytes())
    return h.hexdigest()


def file_hash(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def cut_run(out: Path) -> dict:
    """Train to the cut (step 3 of 6, mid-epoch); what it returns and writes."""
    data, val = golden_data()
    trainer = golden_trainer(data, val, out, max_steps=3)
    res = trainer.train()
    ckpt = out / CUT
    state = json.loads((ckpt / "trainer_state.json").read_text())
    return {
        "history": res.history,
        "best_step": res.best_step,
        "best_metrics": res.best_metrics,
        "weights": weights_hash(trainer.trainable_state_dict()),
        "files": {name: file_hash(ckpt / name) for name in ("trainable.safetensors", "optimizer.safetensors")},
        "best_file": file_hash(out / "best" / "trainable.safetensors"),
        "trainer_state": state["trainer_state"],
        "scheduler": state["scheduler"],
    }


def resumed_run(out: Path) -> dict:
    """Resume the run in ``out`` (``latest``) to the end; what it returns."""
    data, val = golden_data()
    trainer = golden_trainer(data, val, out)
    res = trainer.train(resume_from="latest")
    return {"history": res.history, "global_step": res.global_step, "best_step": res.best_step,
            "best_metrics": res.best_metrics, "weights": weights_hash(trainer.trainable_state_dict()),
            "best_model": weights_hash(trainer.merged_model("best").state_dict())}


# ---------------------------------------------------------------------------------------------- golden values
# computed by `python tests/test_safeclip_golden.py` on main at 4127045 (the mixin trainer); the resumed run's
# history continues the cut run's, which is also the history saved in its checkpoint
CUT_HISTORY: list = [{'step': 1,
  'epoch': 0,
  'lr': 0.01,
  'train/text_safe': 1.4901161193847656e-08,
  'train/text_nsfw': 0.1805993914604187,
  'train/vision_safe': -2.2351741790771484e-08,
  'train/vision_nsfw': 0.007667765021324158,
  'train/S_Vref': 6.598367691040039,
  'train/U_Vref': 4.548277139663696,
  'train/V_Sref': 6.598367393016815,
  'train/G_Sref': 6.283634006977081,
  'train/text_safe_tokens': 0.0,
  'train/loss': 4.341521978378296},
 {'step': 2,
  'epoch': 0,
  'lr': 0.01,
  'train/text_safe': 0.014516443014144897,
  'train/text_nsfw': 0.14720875769853592,
  'train/vision_safe': 0.018639609217643738,
  'train/vision_nsfw': 0.024858973920345306,
  'train/S_Vref': 4.247183322906494,
  'train/U_Vref': 3.1035561561584473,
  'train/V_Sref': 2.4405192136764526,
  'train/G_Sref': 2.50884211063385,
  'train/text_safe_tokens': 0.0,
  'train/loss': 2.1287108659744263},
 {'step': 2,
  'epoch': 1,
  'val/text_safe': 0.08801170438528061,
  'val/text_nsfw': 0.23854125291109085,
  'val/vision_safe': 0.1410008817911148,
  'val/vision_nsfw': 0.13711879402399063,
  'val/S_Vref': 2.5501303672790527,
  'val/U_Vref': 6.156201362609863,
  'val/V_Sref': 8.10077714920044,
  'val/G_Sref': 8.324613571166992,
  'val/text_safe_tokens': 0.0,
  'val/loss': 4.82186484336853,
  'val/R@1 S->V0': 0.0,
  'val/R@1 U->V0': 0.0,
  'val/R@1 V->S0': 0.375,
  'val/R@1 G->S0': 0.375,
  'val/recall_sum': 0.75},
 {'step': 3,
  'epoch': 1,
  'lr': 0.01,
  'train/text_safe': 0.09393151849508286,
  'train/text_nsfw': 0.26823464035987854,
  'train/vision_safe': 0.13933653384447098,
  'train/vision_nsfw': 0.13985353708267212,
  'train/S_Vref': 2.9435776472091675,
  'train/U_Vref': 4.20598030090332,
  'train/V_Sref': 8.2924964427948,
  'train/G_Sref': 8.33849573135376,
  'train/text_safe_tokens': 0.0,
  'train/loss': 4.633075714111328},
 {'step': 3,
  'epoch': 1,
  'val/text_safe': 0.16813910007476807,
  'val/text_nsfw': 0.29161232709884644,
  'val/vision_safe': 0.16789192706346512,
  'val/vision_nsfw': 0.16496101021766663,
  'val/S_Vref': 3.8737590312957764,
  'val/U_Vref': 7.85622763633728,
  'val/V_Sref': 5.6624836921691895,
  'val/G_Sref': 5.717767953872681,
  'val/text_safe_tokens': 0.0,
  'val/loss': 4.173004508018494,
  'val/R@1 S->V0': 0.125,
  'val/R@1 U->V0': 0.125,
  'val/R@1 V->S0': 0.375,
  'val/R@1 G->S0': 0.375,
  'val/recall_sum': 1.0}]
AFTER_CUT: list = [{'step': 4,
  'epoch': 1,
  'lr': 0.01,
  'train/text_safe': 0.20532944798469543,
  'train/text_nsfw': 0.31698739528656006,
  'train/vision_safe': 0.19172857701778412,
  'train/vision_nsfw': 0.17845940589904785,
  'train/S_Vref': 5.669942855834961,
  'train/U_Vref': 6.489853858947754,
  'train/V_Sref': 3.5432920455932617,
  'train/G_Sref': 3.5000765323638916,
  'train/text_safe_tokens': 0.0,
  'train/loss': 3.304518222808838},
 {'step': 4,
  'epoch': 2,
  'val/text_safe': 0.1672094315290451,
  'val/text_nsfw': 0.2589863985776901,
  'val/vision_safe': 0.1612621545791626,
  'val/vision_nsfw': 0.1595136672258377,
  'val/S_Vref': 2.9396326541900635,
  'val/U_Vref': 6.4797844886779785,
  'val/V_Sref': 3.266309976577759,
  'val/G_Sref': 3.2130000591278076,
  'val/text_safe_tokens': 0.0,
  'val/loss': 2.7820459604263306,
  'val/R@1 S->V0': 0.125,
  'val/R@1 U->V0': 0.125,
  'val/R@1 V->S0': 0.375,
  'val/R@1 G->S0': 0.375,
  'val/recall_sum': 1.0},
 {'step': 5,
  'epoch': 2,
  'lr': 0.01,
  'train/text_safe': 0.19050027430057526,
  'train/text_nsfw': 0.2955065071582794,
  'train/vision_safe': 0.11793305724859238,
  'train/vision_nsfw': 0.13115740567445755,
  'train/S_Vref': 3.7357033491134644,
  'train/U_Vref': 5.639935493469238,
  'train/V_Sref': 1.6744742393493652,
  'train/G_Sref': 1.995977759361267,
  'train/text_safe_tokens': 0.0,
  'train/loss': 2.198367178440094},
 {'step': 6,
  'epoch': 2,
  'lr': 0.01,
  'train/text_safe': 0.1585436835885048,
  'train/text_nsfw': 0.20827195793390274,
  'train/vision_safe': 0.21922902762889862,
  'train/vision_nsfw': 0.20298036932945251,
  'train/S_Vref': 1.8215543031692505,
  'train/U_Vref': 2.1319739818573,
  'train/V_Sref': 3.19758540391922,
  'train/G_Sref': 3.448959708213806,
  'train/text_safe_tokens': 0.0,
  'train/loss': 2.063690662384033},
 {'step': 6,
  'epoch': 3,
  'val/text_safe': 0.09244890511035919,
  'val/text_nsfw': 0.1359393298625946,
  'val/vision_safe': 0.19148268550634384,
  'val/vision_nsfw': 0.18701332062482834,
  'val/S_Vref': 1.788464903831482,
  'val/U_Vref': 2.5330708622932434,
  'val/V_Sref': 4.159410715103149,
  'val/G_Sref': 4.134654521942139,
  'val/text_safe_tokens': 0.0,
  'val/loss': 2.438259243965149,
  'val/R@1 S->V0': 0.25,
  'val/R@1 U->V0': 0.25,
  'val/R@1 V->S0': 0.25,
  'val/R@1 G->S0': 0.25,
  'val/recall_sum': 1.0}]
RESUMED_HISTORY: list = [*CUT_HISTORY, *AFTER_CUT]
GOLDEN_CUT: dict = {
    'history': CUT_HISTORY,
    'best_step': 3,
    'best_metrics': {'loss': 4.173004508018494, 'recall_sum': 1.0},
    'weights': '5eeaf2180b3319d3588117b964fa50e354a7f09b2f167f1be7bebca81c902899',
    'files': {
        'trainable.safetensors': '303fb5d563aec828d5331f6a6fe49e23a03faf9824f0d36e8f0683aeb81ef397',
        'optimizer.safetensors': 'bc09ea70c9d6cb8ae3be590c546381f1e29cd5a22c51fb10ff58b96443658040',
    },
    'best_file': '303fb5d563aec828d5331f6a6fe49e23a03faf9824f0d36e8f0683aeb81ef397',
    'trainer_state': {
        'global_step': 3,
        'epoch': 1,
        'batch_in_epoch': 2,
        'best_metric': -1.0,
        'best_tie': 4.173004508018494,
        'best_loss': 4.173004508018494,
        'best_recall_sum': 1.0,
        'best_step': 3,
        'bad_evals': 0,
        'stopped_early': False,
        'history': CUT_HISTORY,
    },
    'scheduler': {'base_lrs': [0.01], 'last_epoch': 3, '_step_count': 4, '_is_initial': False,
                  '_get_lr_called_within_step': False, '_last_lr': [0.01], 'lr_lambdas': [{}]},
}
GOLDEN_RESUMED: dict = {
    'history': RESUMED_HISTORY,
    'global_step': 6,
    'best_step': 6,
    'best_metrics': {'loss': 2.438259243965149, 'recall_sum': 1.0},
    'weights': 'd9a62d7a71d7a5a94009f8f1d1a4f8205628ee05a907f94a366354d55f51d19f',
    'best_model': '96fd4533e4840fc0cb0d771ccd4890e9fcacddf4eb6924c088854e6290de02b3',
}


def test_cut_run_is_bit_identical_to_the_mixin_trainer(tmp_path):
    got = cut_run(tmp_path)
    assert got == GOLDEN_CUT


def test_resume_is_bit_identical_to_the_mixin_trainer(tmp_path):
    cut_run(tmp_path)
    assert resumed_run(tmp_path) == GOLDEN_RESUMED


def test_a_checkpoint_written_by_the_mixin_trainer_resumes(tmp_path):
    out = tmp_path / "run"
    shutil.copytree(FIXTURE, out)
    assert resumed_run(out) == GOLDEN_RESUMED


if __name__ == "__main__":  # regenerate the golden values and the fixture
    import pprint
    import tempfile

    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as tmp:
        cut = cut_run(Path(tmp) / "run")
        if FIXTURE.exists():
            shutil.rmtree(FIXTURE)
        shutil.copytree(Path(tmp) / "run", FIXTURE)
        resumed = resumed_run(Path(tmp) / "run")
    print("GOLDEN_CUT: dict = " + pprint.pformat(cut, width=118, sort_dicts=False))  # (the history above is
    print("GOLDEN_RESUMED: dict = " + pprint.pformat(resumed, width=118, sort_dicts=False))  # CUT_HISTORY etc.)
