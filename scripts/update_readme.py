#!/usr/bin/env python3
"""Copies program output into README.md between its markers, so that the README's figures
are the programs' own output, never typed by hand:

  <!-- demo-output:begin --> ... <!-- demo-output:end -->  <- docs/demo-output.txt
                                                              (`softce demo --threads 2`)
  <!-- bench:begin --> ... <!-- bench:end -->              <- docs/benchmark-table.md
                                                              (`python bench/bench.py --markdown`)
Run it after regenerating either file.
"""
import pathlib
import re
import sys

root = pathlib.Path(__file__).resolve().parent.parent
readme = root / "README.md"
text = readme.read_text()


def splice(text: str, name: str, body: str) -> str:
    pattern = re.compile(rf"(<!-- {name}:begin -->\n).*?(<!-- {name}:end -->)", re.S)
    if not pattern.search(text):
        sys.exit(f"README.md: markers for {name!r} not found")
    return pattern.sub(lambda m: m.group(1) + body.rstrip() + "\n" + m.group(2), text)


demo = root / "docs" / "demo-output.txt"
if demo.exists():
    text = splice(text, "demo-output", "```\n" + demo.read_text().rstrip() + "\n```")
bench = root / "docs" / "benchmark-table.md"
if bench.exists():
    # the README keeps the timing and target tables; the memory table stays in the file
    blocks = bench.read_text().strip().split("\n\n")
    keep, skip = [], False
    for block in blocks:
        if block.startswith("Peak extra memory"):
            skip = True
            continue
        if skip and block.startswith("|"):
            skip = False
            continue
        skip = False
        keep.append(block)
    text = splice(text, "bench", "\n\n".join(keep) + "\n\nPeak extra memory per call: [docs/benchmark-table.md](docs/benchmark-table.md).")
readme.write_text(text)
