"""An independent check set: held-back topic pairs, prompt templates and image styles, a new seed.

The shipped test split is held out from training and from every choice the demo makes, but it was
in view while the testbed was designed. This set is built only from what no build step, no
calibration and no test item uses: the ``unseen`` topic pairs of :func:`~vlmsafe.testbed.topics.split_topics`,
:data:`~vlmsafe.testbed.prompts.UNSEEN_TEMPLATES`, :data:`~vlmsafe.testbed.images.UNSEEN_STYLES` and
fonts, plus blank and noise images, drawn with a seed of your choice::

    python -m vlmsafe.cli.build_unseen --out unseen/ --seed 1
    vlmsafe demo --test unseen/unseen.jsonl --out demo-unseen/

``--build-seed`` must be the testbed's build seed (its ``build_info.json``), since it decides which
topic pairs were held back.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

from vlmsafe.io import atomic_path, check_output
from vlmsafe.testbed.data import split_items
from vlmsafe.testbed.splits import write_split
from vlmsafe.testbed.topics import split_topics


def make_unseen_set(out: str | Path, *, seed: int = 1, build_seed: int = 0, overwrite: bool = False) -> Path:
    """Write ``out/unseen.jsonl`` and its images; return the JSONL path."""
    out = check_output(out, kind="dir", overwrite=overwrite)
    topics = split_topics(build_seed)["unseen"]
    items = split_items("unseen", topics, random.Random(f"unseen-{seed}"))
    with atomic_path(out, overwrite=overwrite) as tmp:
        tmp.mkdir(parents=True)
        write_split(tmp, "unseen", items)
        meta = {
            "seed": seed,
            "build_seed": build_seed,
            "topics": [[t.text, t.category] for t in topics],
            "command": f"python -m vlmsafe.cli.build_unseen --out {out} --seed {seed} --build-seed {build_seed}",
        }
        (tmp / "unseen_info.json").write_text(json.dumps(meta, indent=1) + "\n")
    return out / "unseen.jsonl"


if __name__ == "__main__":  # pragma: no cover  (the command moved to the CLI package with all argparse code)
    raise SystemExit("`python -m vlmsafe.testbed.unseen` is now `python -m vlmsafe.cli.build_unseen`")
