"""Command-line start-up: how long a user waits for ``python -m transfer.run`` to refuse a bad value.

    python bench/bench_startup.py [--repeats 5] [--before REV]

Each command runs in a fresh interpreter (cwd a scratch folder, ``PYTHONPATH`` the checkout), ``--repeats`` times;
the median wall time is printed, with its ratio to ``python -c "import torch"`` (the floor: every command needs
torch). With ``--before REV`` the same commands also run on git revision ``REV`` of this repository (extracted with
``git archive`` into a scratch folder), interleaved with this checkout's runs so that both see the same load, and
the ratio now / before is printed per command. A refusal must stay the same: each command's exit status and
message (the checkout's path written as ``<repo>``) are compared between the two trees and a difference is
printed. Figures describe this machine at this moment; nothing passes or fails on time.
"""
from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

# (label, argv after the interpreter, expected exit status)
COMMANDS = [
    ("import torch", ["-c", "import torch"], 0),
    ("import transfer.run", ["-c", "import transfer.run"], 0),
    ("transfer.run task=nonsense", ["-m", "transfer.run", "task=nonsense"], 2),
    ("transfer.run trainer.accelerator=tpu", ["-m", "transfer.run", "trainer.accelerator=tpu"], 2),
    ("transfer.run task=voc_detection task.freeze_at=9",
     ["-m", "transfer.run", "task=voc_detection", "task.freeze_at=9"], 2),
]


def run_once(tree: Path, argv: list[str], cwd: Path) -> tuple[float, int, str]:
    """Seconds, exit status and stderr's last line (the refusal) of ``python ARGV`` with ``tree`` on the path."""
    env = {**os.environ, "PYTHONPATH": str(tree), "WANDB_MODE": "disabled"}
    start = time.perf_counter()
    done = subprocess.run([sys.executable, *argv], cwd=cwd, env=env, capture_output=True, text=True)
    seconds = time.perf_counter() - start
    last = done.stderr.strip().splitlines()[-1] if done.stderr.strip() else ""
    return seconds, done.returncode, last.replace(str(tree), "<repo>")


def extract(rev: str, into: Path) -> Path:
    """Revision ``rev`` of this repository as files under ``into``."""
    archive = into / "before.tar"
    with open(archive, "wb") as f:
        subprocess.run(["git", "-C", str(REPO), "archive", rev], stdout=f, check=True)
    tree = into / "before"
    with tarfile.open(archive) as tar:
        tar.extractall(tree, filter="data")
    return tree


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--before", metavar="REV", help="also time git revision REV, interleaved")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as scratch:
        scratch = Path(scratch)
        cwd = scratch / "cwd"
        cwd.mkdir()
        trees = {"now": REPO}
        if args.before:
            trees = {"before": extract(args.before, scratch), **trees}
        times = {(t, label): [] for t in trees for label, _, _ in COMMANDS}
        outcome: dict[tuple[str, str], tuple[int, str]] = {}
        for _ in range(args.repeats):
            for label, cmd, _ in COMMANDS:
                for t, tree in trees.items():
                    seconds, status, last = run_once(tree, cmd, cwd)
                    times[t, label].append(seconds)
                    outcome[t, label] = (status, last)
    median = {k: statistics.median(v) for k, v in times.items()}
    print(f"python {sys.version.split()[0]}, {os.cpu_count()} CPUs, load average "
          f"{' '.join(f'{x:.1f}' for x in os.getloadavg())}; median of {args.repeats} fresh interpreters, seconds"
          + (f"; before = {args.before}" if args.before else ""))
    head = "".join(f"{t:>9} {'/torch':>7}" for t in trees) + ("  now/before" if args.before else "")
    print(f"{'command':<52}{head}")
    for label, _, expected in COMMANDS:
        row = "".join(f"{median[t, label]:9.2f} {median[t, label] / median[t, 'import torch']:6.2f}x" for t in trees)
        if args.before:
            row += f"  {median['now', label] / median['before', label]:9.2f}x"
        print(f"{label:<52}{row}")
        for t in trees:
            status, last = outcome[t, label]
            if status != expected:
                print(f"  {t}: exit status {status}, expected {expected}: {last}")
        if args.before and outcome["now", label] != outcome["before", label]:
            before, now = outcome["before", label], outcome["now", label]
            print(f"  the outcome differs:\n    before: {before}\n    now:    {now}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
