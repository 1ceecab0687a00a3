"""Placeholder until the models land (issue 5)."""


def entry_point():
    raise SystemExit("train.py: not implemented yet")
