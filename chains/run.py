"""``python -m chains.run``: measure a workload, sweep knobs, draw figures (see `chains.harness.cli`)."""

from chains.harness.cli import main

if __name__ == "__main__":
    raise SystemExit(main())
