"""Run the benchmark modules in this folder and collect their markdown tables in bench/RESULTS.md.

``python -m bench`` runs every ``bench_*.py`` and writes the file afresh; ``python -m bench bench_serving
bench_middleware`` runs only those and replaces their sections, keeping the others' as they were measured.
"""

from __future__ import annotations

import datetime
import platform
import re
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).parent


def _header() -> str:
    return (f"# Benchmarks\n\n{datetime.date.today()}, {platform.machine()}, {platform.python_version()}, "
            f"`make bench`\n")


def _sections(text: str) -> dict[str, str]:
    """The ``## name`` sections of an existing RESULTS.md, by name (in file order)."""
    parts = re.split(r"^## ", text, flags=re.MULTILINE)[1:]
    return {part.split("\n", 1)[0].strip(): "## " + part.rstrip() + "\n" for part in parts}


def _run(name: str) -> tuple[str, bool]:
    print(f"== {name}", flush=True)
    run = subprocess.run([sys.executable, "-m", f"bench.{name}"], capture_output=True, text=True)
    if run.returncode != 0:
        print(run.stderr[-3000:], file=sys.stderr)
        return f"## {name}\n\nfailed (exit {run.returncode})\n", False
    print(run.stdout)
    return f"## {name}\n\n{run.stdout.strip()}\n", True


def main(argv: list[str] | None = None) -> int:
    available = [p.stem for p in sorted(HERE.glob("bench_*.py"))]
    wanted = list(sys.argv[1:] if argv is None else argv)
    unknown = [n for n in wanted if n not in available]
    if unknown:
        print(f"error: no benchmark {', '.join(unknown)}; known: {', '.join(available)}", file=sys.stderr)
        return 2
    results = HERE / "RESULTS.md"
    # Only some asked for: the other sections stay as last measured (their dates are the file's history).
    sections = _sections(results.read_text()) if wanted and results.exists() else {}
    failed = 0
    for name in wanted or available:
        sections[name], ok = _run(name)
        failed += not ok
    ordered = [sections[n] for n in available if n in sections]
    results.write_text(_header() + "\n" + "\n".join(ordered))
    print(f"wrote {results}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
