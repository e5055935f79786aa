"""What a CI run skipped, from pytest's JUnit XML: every test skipped because it needs a GPU, one id a line (CI
has none, so these never ran: run them on a CUDA machine), then the count of the other skips by reason.

usage: python .ci/skips.py REPORT.xml [--counts-only]
"""

import re
import sys
import xml.etree.ElementTree as ET
from collections import Counter
from pathlib import Path

# Skip messages that mean "no GPU here": ours (tests/test_gpu.py) and transformers' generic tests' require_*
# decorators (CUDA, any accelerator, several, Apple MPS, Flash Attention kernels, which only build for GPUs).
# "needs a machine without CUDA" names CUDA too, but skips only where there is a GPU.
GPU = re.compile(r"\b(CUDA|GPUs?|accelerators?|MPS|XPU|NPU|Flash Attention)\b")
NOT_GPU = re.compile(r"\bwithout\b")


def needs_gpu(message: str) -> bool:
    return bool(GPU.search(message)) and not NOT_GPU.search(message)


def test_id(classname: str, name: str) -> str:
    """pytest's node id from JUnit's dotted classname: the longest prefix that is a .py file, then classes."""
    parts = classname.split(".")
    for cut in range(len(parts), 0, -1):
        path = "/".join(parts[:cut]) + ".py"
        if Path(path).is_file():
            return "::".join([path, *parts[cut:], name])
    return f"{classname}::{name}"


def skips(report: Path) -> list[tuple[str, str]]:
    """(test id, skip message) for every skipped test case."""
    out = []
    for case in ET.parse(report).getroot().iter("testcase"):
        skipped = case.find("skipped")
        if skipped is not None:
            message = skipped.get("message", "").removeprefix("Skipped: ") or "(no reason given)"
            out.append((test_id(case.get("classname", ""), case.get("name", "")), message))
    return out


def main(report: str, counts_only: bool = False) -> None:
    found = skips(Path(report))
    gpu = [(test, message) for test, message in found if needs_gpu(message)]
    print(f"skipped because they need a GPU: {len(gpu)}" + (" tests:" if gpu and not counts_only else ""))
    if not counts_only:
        for test, message in gpu:
            print(f"  {test}  ({message})")
    other = Counter(message for _, message in found if not needs_gpu(message))
    print(f"other skips: {sum(other.values())}" + (", by reason:" if other else ""))
    for message, count in other.most_common():
        print(f"  {count:4d}  {message}")


if __name__ == "__main__":
    main(sys.argv[1], counts_only="--counts-only" in sys.argv[2:])
