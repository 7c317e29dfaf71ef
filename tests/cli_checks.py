"""Assertions shared by the bad-input tests: what "refused" means for a command."""

from __future__ import annotations


def one_line_error(rc: int, err: str, *expected: str) -> str:
    """Exit 2, exactly one stderr line (no traceback) holding every ``expected`` part; return the line."""
    lines = err.strip().splitlines()
    assert rc == 2, err
    assert len(lines) == 1 and "Traceback" not in err, err
    assert lines[0].startswith("vlmsafe") and "error:" in lines[0], err
    for part in expected:
        assert part in lines[0], f"expected {part!r} in: {lines[0]}"
    return lines[0]
