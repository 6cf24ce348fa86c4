"""Lines of Python at a git revision: raw lines and code lines (no blank lines, comments or
docstrings), per file and in total. A file absent at the revision counts 0.

    python scripts/loc.py REV FILE...      e.g. python scripts/loc.py HEAD~3 edgekit/mqtt/*.py
"""

from __future__ import annotations

import ast
import io
import subprocess
import sys
import tokenize

_SKIP = {tokenize.COMMENT, tokenize.NL, tokenize.NEWLINE, tokenize.INDENT, tokenize.DEDENT}


def code_lines(source: str) -> int:
    """Lines holding code: not blank, not only a comment, not part of a string statement."""
    strings: set[int] = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Expr) and isinstance(node.value, ast.Constant):
            strings.update(range(node.lineno, (node.end_lineno or node.lineno) + 1))
    lines: set[int] = set()
    for token in tokenize.generate_tokens(io.StringIO(source).readline):
        if token.type not in _SKIP and token.type != tokenize.ENDMARKER:
            lines.update(range(token.start[0], token.end[0] + 1))
    return len(lines - strings)


def main() -> None:
    revision, files = sys.argv[1], sys.argv[2:]
    total_code = total_raw = 0
    for name in files:
        shown = subprocess.run(
            ["git", "show", f"{revision}:{name}"], check=False, capture_output=True, text=True
        )
        source = shown.stdout if shown.returncode == 0 else ""
        code, raw = code_lines(source), source.count("\n")
        total_code, total_raw = total_code + code, total_raw + raw
        print(f"{code:6d} {raw:6d}  {name}")
    print(f"{total_code:6d} {total_raw:6d}  total (code lines, raw lines) at {revision}")


if __name__ == "__main__":
    main()
