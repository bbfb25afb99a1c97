"""Crash soak: the harness of ``tests/test_crash.py`` with many more SIGKILLs.

Each run of the crash recipe (3 epochs of 10 steps, a checkpoint after every step) is killed up
to 7 times, while starting, while training or in the middle of a checkpoint write, and resumed
with ``--resume auto`` until it completes; then its final state is compared bit for bit with a
run that was never killed. Any failed check stops the soak with the assertion that failed.

    python benchmarks/crash_soak.py --kills 300 --seed 1
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from test_crash import run_trials  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--kills", type=int, default=200, help="SIGKILLs to inject in all (default 200)")
    parser.add_argument("--seed", type=int, default=1, help="seed of the kill moments")
    args = parser.parse_args()
    started = time.perf_counter()
    with tempfile.TemporaryDirectory() as root:
        tally = run_trials(Path(root), args.kills, args.seed)
    print(
        f"{tally.killed()} kills ({', '.join(f'{n} {k}' for k, n in tally.kills.items())}), "
        f"{tally.killed_mid_save} of them cutting a checkpoint write short; {tally.launches} processes, "
        f"{tally.resumed} resumed from a checkpoint, {tally.fresh} started fresh; {tally.runs} runs completed, "
        f"{tally.lost} with a final state different from the uninterrupted run's; "
        f"{time.perf_counter() - started:.0f} s"
    )
    sys.exit(1 if tally.lost else 0)


if __name__ == "__main__":
    main()
