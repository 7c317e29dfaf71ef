"""How long `vlmsafe --help` and every subcommand's `--help` take, beside the interpreter and `import torch`.

Each command runs in a fresh process (``python -m vlmsafe.cli ... --help``), ``--repeat`` times in rotation, and
is reported as the median with [min, max] wall seconds. The peers in the same run: a bare interpreter
(``python -c pass``, the floor any command pays) and ``python -c "import torch"`` (what a help screen would cost
if it loaded the model code). Usage::

    python benchmarks/cli_startup.py              # 5 repeats
    python benchmarks/cli_startup.py --repeat 9
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import time

COMMANDS = [
    [], ["demo"], ["calibrate"], ["generate"], ["evaluate"], ["merge"], ["merge-mask"], ["convert-llava"],
    ["safeclip"], ["safeclip", "train"], ["safeclip", "eval"], ["safeclip", "pairs", "train"],
    ["safeclip", "pairs", "generate"], ["safeclip", "generate"], ["probe", "layers"], ["probe", "shift"],
    ["probe", "weights"],
]
TARGET_S = 1.0


def timed(argv: list[str]) -> float:
    start = time.perf_counter()
    subprocess.run(argv, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return time.perf_counter() - start


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=5, help="runs per command (default 5)")
    args = parser.parse_args()
    runs: dict[str, list[float]] = {}
    peers = {"python -c pass (floor)": [sys.executable, "-c", "pass"],
             "python -c 'import torch' (peer)": [sys.executable, "-c", "import torch"]}
    jobs = {**peers, **{"vlmsafe " + " ".join([*cmd, "--help"]): [sys.executable, "-m", "vlmsafe.cli", *cmd, "--help"]
                        for cmd in COMMANDS}}
    for _ in range(args.repeat):
        for name, argv in jobs.items():
            runs.setdefault(name, []).append(timed(argv))
    width = max(map(len, runs))
    print(f"{'command':<{width}}  median s  [min, max]")
    for name, times in runs.items():
        print(f"{name:<{width}}  {statistics.median(times):8.2f}  [{min(times):.2f}, {max(times):.2f}]")
    worst_name, worst = max(((n, statistics.median(t)) for n, t in runs.items() if n.startswith("vlmsafe")),
                            key=lambda x: x[1])
    torch_s = statistics.median(runs["python -c 'import torch' (peer)"])
    print(f"slowest help screen ({worst_name}): {worst:.2f} s, {worst / torch_s:.2f}x `import torch` "
          f"(target < {TARGET_S:g} s: {'met' if worst < TARGET_S else 'missed'})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
