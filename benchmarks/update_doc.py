#!/usr/bin/env python3
"""Copy the latest benchmarks/results/<name>/result.md into docs/benchmarks.md.

    python benchmarks/update_doc.py

Replaces the text between `<!-- BEGIN results/<name> -->` and
`<!-- END results/<name> -->` with that result.md (its image links made
relative to docs/).  The prose around the markers is not touched: re-read it
when the figures change.
"""
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DOC = ROOT / "docs" / "benchmarks.md"
BLOCK = re.compile(r"(<!-- BEGIN results/([\w.-]+) -->\n)(.*?)(<!-- END results/\2 -->)", re.S)


def main():
    text = DOC.read_text()

    def repl(m):
        name = m.group(2)
        src = ROOT / "benchmarks" / "results" / name / "result.md"
        if not src.exists():
            print(f"no {src}; section left as it is", file=sys.stderr)
            return m.group(0)
        body = src.read_text().rstrip() + "\n"
        body = re.sub(r"\]\((?!https?:|/|\.\./)([^)]+)\)",
                      lambda x: f"](../benchmarks/results/{name}/{x.group(1)})", body)
        body = re.sub(r"^### ", "#### ", body, flags=re.M)
        return m.group(1) + body + m.group(4)

    new, n = BLOCK.subn(repl, text)
    DOC.write_text(new)
    print(f"updated {n} result sections in {DOC}")


if __name__ == "__main__":
    main()
