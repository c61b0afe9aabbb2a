"""What deploy/k8s/gen_*.py share: write the files a generator makes, or with ``--check`` only
say which are out of date (exit 1), as the tests run it."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def write_or_check(outputs: Callable[[], dict[Path, str]], description: str, script: str) -> int:
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--check", action="store_true", help="only check the files are up to date")
    args = parser.parse_args()
    stale = []
    for path, text in outputs().items():
        if path.exists() and path.read_text() == text:
            continue
        if args.check:
            stale.append(str(path.relative_to(ROOT)))
        else:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(text)
            print(f"wrote {path.relative_to(ROOT)}")
    if stale:
        print(f"not up to date (run deploy/k8s/{script}): " + ", ".join(stale), file=sys.stderr)
        return 1
    return 0
