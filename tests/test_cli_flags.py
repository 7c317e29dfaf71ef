"""Library errors name parameters; the command line names its flags (one translation, in the router)."""

from __future__ import annotations

import argparse

import pytest

from vlmsafe.cli import flags_for_parameters
from vlmsafe.errors import InputError


def test_library_error_names_the_parameter():
    from vlmsafe.safeclip.generate import GenerateSettings

    with pytest.raises(InputError) as info:
        GenerateSettings(height=30)
    assert str(info.value).startswith("`height` 30 is not a multiple of 8") and "--" not in str(info.value)


def test_router_translates_parameters_to_the_commands_flags():
    parser = argparse.ArgumentParser()
    parser.add_argument("--text-encoder-2")
    parser.add_argument("-o", "--out", dest="output")
    parser.set_defaults(parameter_flags={"prompts_file": "--prompts"})
    message = "`text_encoder_2` was given but x has no text_encoder_2; `output` and `prompts_file`, not `steps`"
    assert flags_for_parameters(message, parser) == (
        "--text-encoder-2 was given but x has no text_encoder_2; --out and --prompts, not `steps`"
    )


def test_cli_error_names_the_flag(tmp_path, capsys):
    from vlmsafe.cli import main

    (tmp_path / "p.txt").write_text("a red circle\n")
    rc = main(["safeclip", "generate", "--pipeline", str(tmp_path / "pipe"), "--text-encoder", str(tmp_path / "enc"),
               "--prompts", str(tmp_path / "p.txt"), "--out", str(tmp_path / "out"), "--height", "30"])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and err == ("vlmsafe safeclip: error: --height 30 is not a multiple of 8; diffusers pipelines "
                               "need e.g. 24"), err


@pytest.mark.parametrize("kwargs", [{"match": "sometimes"}, {"refusal_phrases": "sorry"}, {"refusal_phrases": [" "]},
                                    {"opening_words": 0}])
def test_judge_settings_are_refused_as_user_errors(kwargs):
    """A bad judge setting is a user error (InputError: one line, exit 2 on the command line), no bare ValueError."""
    from vlmsafe.eval import RefusalJudge

    with pytest.raises(InputError):
        RefusalJudge(**kwargs)
