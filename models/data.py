"""Shared helpers for the file readers: errors that name the file, vocabularies, batching."""

from __future__ import annotations

import os
from typing import Iterator, Mapping, Sequence

import numpy as np


class DataError(ValueError):
    """Input data that cannot be used: missing or empty file, malformed line, vocabulary that
    does not fit the model. The message names the file (and line where there is one)."""


def read_lines(path: str | os.PathLike, what: str, encoding: str = "utf-8") -> list[str]:
    """All lines of `path` without line ends; DataError if it is missing, unreadable or empty."""
    path = os.fspath(path)
    if not os.path.exists(path):
        raise DataError(f"{what} file {path} does not exist")
    if os.path.isdir(path):
        raise DataError(f"{what} file {path} is a directory, expected a file")
    try:
        with open(path, encoding=encoding) as f:
            lines = f.read().splitlines()
    except UnicodeDecodeError as e:
        raise DataError(
            f"{what} file {path} is not {encoding} text ({e.reason} at byte {e.start})"
        ) from None
    except OSError as e:
        raise DataError(f"cannot read {what} file {path}: {e.strerror}") from None
    if not any(line.strip() for line in lines):
        raise DataError(f"{what} file {path} is empty")
    return lines


def load_vocab(
    path: str | os.PathLike, what: str = "vocabulary", required: Sequence[str] = ()
) -> dict[str, int]:
    """Token -> id (line number, from 0) of a one-token-per-line vocabulary file.

    `required` tokens must be present (and, for GNMT-style vocabularies, they are checked to be
    the first lines by the caller)."""
    lines = read_lines(path, what)
    vocab: dict[str, int] = {}
    for i, line in enumerate(lines):
        token = line.rstrip("\r\n").strip()
        if not token:
            raise DataError(
                f"{path}:{i + 1}: empty line in {what} file (one token per line expected)"
            )
        if token in vocab:
            raise DataError(
                f"{path}:{i + 1}: token {token!r} repeats line {vocab[token] + 1} "
                f"of the {what} file"
            )
        vocab[token] = i
    missing = [t for t in required if t not in vocab]
    if missing:
        raise DataError(f"{what} file {path} lacks the special tokens {missing}")
    return vocab


def check_vocab_fits(vocab: Mapping[str, int], path: str, model_vocab_size: int, model: str):
    if len(vocab) > model_vocab_size:
        raise DataError(
            f"vocabulary {path} has {len(vocab)} tokens but {model} has vocab_size "
            f"{model_vocab_size}; build the model with vocab_size={len(vocab)} "
            f"(e.g. get_model(..., vocab_size={len(vocab)}))"
        )


def iterate_batches(
    arrays: Mapping[str, np.ndarray],
    batch_size: int,
    shuffle: bool,
    seed: int,
    epochs: int | None,
    source: str,
) -> Iterator[dict[str, np.ndarray]]:
    """Batches of exactly `batch_size` rows (the remainder of an epoch is dropped), reshuffled
    every epoch when `shuffle`; `epochs=None` repeats forever."""
    num_rows = len(next(iter(arrays.values())))
    if batch_size <= 0:
        raise ValueError(f"batch_size must be positive, got {batch_size}")
    if num_rows < batch_size:
        raise DataError(
            f"{source} has {num_rows} usable examples, fewer than one batch of {batch_size}"
        )
    rng = np.random.default_rng(seed)
    epoch = 0
    while epochs is None or epoch < epochs:
        order = rng.permutation(num_rows) if shuffle else np.arange(num_rows)
        for start in range(0, num_rows - batch_size + 1, batch_size):
            rows = order[start : start + batch_size]
            yield {name: arr[rows] for name, arr in arrays.items()}
        epoch += 1
