"""BERT's WordPiece tokenisation (uncased): basic splitting, then greedy longest-match pieces.

Basic step: drop control characters, put spaces around CJK characters, lower-case and strip
accents, split on whitespace and split off every punctuation character. WordPiece step: each
word becomes the longest vocabulary prefix, then the longest `##`-prefixed continuation, and so
on; a word that cannot be covered (or is longer than 100 characters) becomes `[UNK]`.
"""

from __future__ import annotations

import unicodedata

from models.data import DataError, load_vocab

SPECIAL_TOKENS = ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]")
MAX_WORD_CHARS = 100


def _is_punctuation(ch: str) -> bool:
    cp = ord(ch)
    # ASCII non-letters/digits count as punctuation ("$", "^", "`" too), like BERT.
    if 33 <= cp <= 47 or 58 <= cp <= 64 or 91 <= cp <= 96 or 123 <= cp <= 126:
        return True
    return unicodedata.category(ch).startswith("P")


def _is_cjk(cp: int) -> bool:
    return (
        0x4E00 <= cp <= 0x9FFF
        or 0x3400 <= cp <= 0x4DBF
        or 0x20000 <= cp <= 0x2A6DF
        or 0x2A700 <= cp <= 0x2B73F
        or 0x2B740 <= cp <= 0x2B81F
        or 0x2B820 <= cp <= 0x2CEAF
        or 0xF900 <= cp <= 0xFAFF
        or 0x2F800 <= cp <= 0x2FA1F
    )


def basic_split(text: str) -> list[str]:
    """Lower-cased, accent-free words and punctuation marks of `text`."""
    chars = []
    for ch in text:
        cp = ord(ch)
        if cp == 0 or cp == 0xFFFD:
            continue
        if ch in "\t\n\r" or unicodedata.category(ch) == "Zs":
            chars.append(" ")
        elif unicodedata.category(ch) in ("Cc", "Cf"):
            continue
        elif _is_cjk(cp):
            chars.append(f" {ch} ")
        else:
            chars.append(ch)
    words = []
    for word in "".join(chars).lower().split():
        word = "".join(
            c for c in unicodedata.normalize("NFD", word) if unicodedata.category(c) != "Mn"
        )
        current = []
        for ch in word:
            if _is_punctuation(ch):
                if current:
                    words.append("".join(current))
                    current = []
                words.append(ch)
            else:
                current.append(ch)
        if current:
            words.append("".join(current))
    return words


class WordPieceTokenizer:
    def __init__(self, vocab_file: str):
        self.vocab_file = str(vocab_file)
        self.vocab = load_vocab(vocab_file, "WordPiece vocabulary", required=SPECIAL_TOKENS)
        self.unk_id = self.vocab["[UNK]"]

    def word_pieces(self, word: str) -> list[str]:
        if len(word) > MAX_WORD_CHARS:
            return ["[UNK]"]
        pieces, start = [], 0
        while start < len(word):
            end = len(word)
            piece = None
            while end > start:
                candidate = word[start:end] if start == 0 else "##" + word[start:end]
                if candidate in self.vocab:
                    piece = candidate
                    break
                end -= 1
            if piece is None:
                return ["[UNK]"]
            pieces.append(piece)
            start = end
        return pieces

    def tokenize(self, text: str) -> list[str]:
        return [p for w in basic_split(text) for p in self.word_pieces(w)]

    def ids(self, tokens: list[str]) -> list[int]:
        return [self.vocab.get(t, self.unk_id) for t in tokens]

    def id_of(self, token: str) -> int:
        if token not in self.vocab:
            raise DataError(f"WordPiece vocabulary {self.vocab_file} has no token {token!r}")
        return self.vocab[token]
