"""Run every benchmark module in this folder and collect their markdown tables in bench/RESULTS.md."""

from __future__ import annotations

import datetime
import platform
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).parent


def main() -> int:
    sections = [f"# Benchmarks\n\n{datetime.date.today()}, {platform.machine()}, {platform.python_version()}, "
                f"`make bench`\n"]
    failed = 0
    for script in sorted(HERE.glob("bench_*.py")):
        print(f"== {script.stem}", flush=True)
        run = subprocess.run([sys.executable, "-m", f"bench.{script.stem}"], capture_output=True, text=True)
        if run.returncode != 0:
            failed += 1
            print(run.stderr[-3000:], file=sys.stderr)
            sections.append(f"## {script.stem}\n\nfailed (exit {run.returncode})\n")
            continue
        print(run.stdout)
        sections.append(f"## {script.stem}\n\n{run.stdout.strip()}\n")
    (HERE / "RESULTS.md").write_text("\n".join(sections))
    print(f"wrote {HERE / 'RESULTS.md'}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
