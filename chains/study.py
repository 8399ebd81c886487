"""``python -m chains.study``: the study's whole measurement (see `chains.harness.study`)."""

from chains.harness.study import main

if __name__ == "__main__":
    raise SystemExit(main())
