"""vlmsafe.distributed: the single-process identities and leaving a process group cleanly."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist

from vlmsafe import cli
from vlmsafe.distributed import all_reduce_sum, gather, shutdown


def _init_single_process_group(tmp_path):
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)


@pytest.mark.skipif(not dist.is_available(), reason="torch.distributed not built")
@pytest.mark.parametrize("barrier", [True, False])
def test_shutdown_destroys_the_group(tmp_path, barrier):
    _init_single_process_group(tmp_path)
    assert dist.is_initialized()
    shutdown(barrier=barrier)
    assert not dist.is_initialized()
    shutdown()  # no group: a no-op


@pytest.mark.skipif(not dist.is_available(), reason="torch.distributed not built")
@pytest.mark.parametrize("fails", [False, True])
def test_cli_leaves_the_process_group_whatever_the_outcome(tmp_path, monkeypatch, fails):
    """Exiting with the group up can abort a finished process under load; the CLI always leaves it,
    meeting the other processes first only on success (after an error they may never arrive)."""
    _init_single_process_group(tmp_path)
    barriers = []
    monkeypatch.setattr(dist, "barrier", lambda *a, **k: barriers.append(1))
    if fails:
        code = cli.main(["calibrate", "--model", str(tmp_path / "missing"), "--data", str(tmp_path / "x.jsonl"),
                         "--out", str(tmp_path / "out")])
    else:
        monkeypatch.setattr(cli, "build_parser", _parser_running(lambda args: 0))
        code = cli.main(["ok"])
    assert not dist.is_initialized()
    assert (code, barriers) == ((2, []) if fails else (0, [1]))


def _parser_running(func):
    def build():
        import argparse

        p = argparse.ArgumentParser()
        p.add_argument("command")
        p.set_defaults(func=func)
        return p

    return build


def test_single_process_identities():
    assert gather([1, 2], None) == [1, 2]
    t = torch.ones(2)
    assert all_reduce_sum(t, None) is t
