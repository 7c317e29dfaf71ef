"""An independent check set: held-back topic pairs, prompt templates and image styles, a new seed.

The shipped test split is held out from training and from every choice the demo makes, but it was
in view while the testbed was designed. This set is built only from what no build step, no
calibration and no test item uses: the ``unseen`` topic pairs of :func:`~vlmsafe.testbed.topics.split_topics`,
:data:`~vlmsafe.testbed.prompts.UNSEEN_TEMPLATES`, :data:`~vlmsafe.testbed.images.UNSEEN_STYLES` and
fonts, plus blank and noise images, drawn with a seed of your choice::

    python -m vlmsafe.testbed.unseen --out unseen/ --seed 1
    vlmsafe demo --test unseen/unseen.jsonl --out demo-unseen/

``--build-seed`` must be the testbed's build seed (its ``build_info.json``), since it decides which
topic pairs were held back.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
from collections.abc import Sequence
from pathlib import Path

from vlmsafe.errors import VlmsafeError
from vlmsafe.io import atomic_path, check_output
from vlmsafe.testbed.data import split_items
from vlmsafe.testbed.splits import write_split
from vlmsafe.testbed.topics import split_topics
from vlmsafe.validation import seed_arg


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
            "command": f"python -m vlmsafe.testbed.unseen --out {out} --seed {seed} --build-seed {build_seed}",
        }
        (tmp / "unseen_info.json").write_text(json.dumps(meta, indent=1) + "\n")
    return out / "unseen.jsonl"


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        prog="python -m vlmsafe.testbed.unseen",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    ap.add_argument("--out", required=True, help="output folder")
    ap.add_argument("--seed", type=seed_arg(), default=1, help="seed of templates, images and sampling")
    ap.add_argument("--build-seed", type=seed_arg(), default=0, help="the testbed's build seed")
    ap.add_argument("--overwrite", action="store_true", help="replace an existing non-empty --out folder")
    args = ap.parse_args(argv)
    try:
        path = make_unseen_set(args.out, seed=args.seed, build_seed=args.build_seed, overwrite=args.overwrite)
    except VlmsafeError as exc:
        print(f"{ap.prog}: error: {exc}", file=sys.stderr)
        return 2
    print(path)
    return 0


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
