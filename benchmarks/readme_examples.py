"""Run the README's example commands on the real stories260K checkpoint and record their output and wall time.

    python benchmarks/readme_examples.py [--only demo recipe finetune] > benchmarks/results/readme_examples.md

The README's "real output" blocks (the demo, the example recipe run and its re-run, the fine-tuning example) are
copied from this file's output, so every number they show and every time quoted beside them has a source. Each
command runs from the checkout root in a fresh `out/` folder; wall time is one run (these are walkthroughs, not
benchmarks), printed with the machine and its load average, since a loaded 2-core machine runs them slower.
"""

import argparse
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import machine  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
REAL = ROOT.parent / "shared" / "real"
EXAMPLES = {
    "demo": (["bash scripts/demo.sh"], ["out/demo-tpa", "out/demo-mfa-half"]),
    "recipe": (
        ["factorconv -q run examples/stories260k-mfa-kr.yaml",
         "factorconv -q run examples/stories260k-mfa-kr.yaml          # again: every stage is complete"],
        ["out/stories260k-mfa-kr", "out/stories260k-mfa-kr-converted"],
    ),
    "finetune": (
        ["factorconv -q convert ../shared/real/stories260K-hf out/stories-tpa1 --rank-k 1 --rank-v 1",
         "factorconv -q finetune out/stories-tpa1 out/stories-tpa1-healed --data ../shared/real/tinystories/tinystories.txt"
         " --eval-data ../shared/real/tinystories/TinyStories-valid.txt --steps 400 --seq-len 512 --batch-size 4"
         " --lr 2e-2"],
        ["out/stories-tpa1", "out/stories-tpa1-healed"],
    ),
}


def run(command: str) -> tuple[str, float]:
    """The command's stdout and stderr as a user sees them, and its wall time; a failure stops the script."""
    start = time.perf_counter()
    done = subprocess.run(command.split("#")[0], shell=True, cwd=ROOT, capture_output=True, text=True)
    seconds = time.perf_counter() - start
    if done.returncode != 0:
        sys.exit(f"{command} failed ({done.returncode}):\n{done.stdout}{done.stderr}")
    return done.stdout + done.stderr, seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", nargs="+", choices=list(EXAMPLES), default=list(EXAMPLES))
    args = parser.parse_args()
    if not (REAL / "stories260K-hf" / "config.json").is_file():
        sys.exit(f"needs the real checkpoints in {REAL}")
    print(f"{machine()}; {os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f} at the start\n")
    for name in args.only:
        commands, folders = EXAMPLES[name]
        for folder in folders:
            shutil.rmtree(ROOT / folder, ignore_errors=True)
        print(f"### {name}\n")
        for command in commands:
            output, seconds = run(command)
            print(f"`{command}`: {seconds:.0f} s wall (load average {os.getloadavg()[0]:.1f} after)\n")
            print("```\n$ " + command + "\n" + output.rstrip() + "\n```\n", flush=True)


if __name__ == "__main__":
    main()
