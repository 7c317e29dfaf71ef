"""The README's Python examples run as written, in order, on the bundled testbed."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
FENCE = re.compile(r"^```python\n(.*?)^```", re.S | re.M)


def readme_blocks() -> list[str]:
    return FENCE.findall((ROOT / "README.md").read_text(encoding="utf-8"))


def test_readme_python_examples_run(tmp_path):
    blocks = readme_blocks()
    assert len(blocks) >= 4  # steering, adapter registration, activations, device map
    script = "\n\n".join(f"# --- README block {i}\n{block}" for i, block in enumerate(blocks))
    (tmp_path / "readme_examples.py").write_text(script, encoding="utf-8")
    (tmp_path / "assets").symlink_to(ROOT / "assets")  # the examples name assets/... relative to the checkout
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT)}
    result = subprocess.run([sys.executable, "readme_examples.py"], cwd=tmp_path, env=env,
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    # what the examples promise: vectors saved, two steered answers and the recorded shape printed
    assert (tmp_path / "vectors" / "vectors.safetensors").is_file()
    printed = [line for line in result.stdout.splitlines() if line.strip()]
    assert len(printed) >= 3, result.stdout
    assert printed[-1].startswith("torch.Size([1, ")


def test_readme_links_point_at_files_in_the_checkout():
    broken = []
    for readme in [ROOT / "README.md", *sorted((ROOT / "assets").glob("*/README.md"))]:
        for target in re.findall(r"\]\(([^)#\s]+)", readme.read_text(encoding="utf-8")):
            if not target.startswith(("http://", "https://", "mailto:")) and not (readme.parent / target).exists():
                broken.append(f"{readme.relative_to(ROOT)} -> {target}")
    assert not broken, broken


def test_readme_support_table_is_the_generated_one():
    from vlmsafe.adapters import support_table

    text = (ROOT / "README.md").read_text(encoding="utf-8")
    block = text.split("<!-- SUPPORT-TABLE-START -->\n", 1)[1].split("\n<!-- SUPPORT-TABLE-END -->", 1)[0]
    assert block.strip() == support_table().strip(), "regenerate it from vlmsafe.adapters.support_table()"
