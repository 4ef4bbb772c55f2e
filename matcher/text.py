"""Text normalisation and word tokens for English and Chinese product text."""
from __future__ import annotations

import html
import re
import unicodedata
from functools import lru_cache

_TAG = re.compile(r"<[^>]*>")
_WS = re.compile(r"\s+")
_CJK = re.compile(r"[\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff]")
_LATIN_WORD = re.compile(r"[a-z0-9]+(?:['\-][a-z0-9]+)*")

EN_STOP_WORDS = frozenset(
    "a an and are as at be by for from has have in is it its of on or that the this to was were with".split()
)
ZH_STOP_WORDS = frozenset("的 了 和 是 在 与 及 或 就 都 而 也 又 之 其 这 那 有 为 款 新款".split())


def normalize_text(value: object, max_chars: int) -> tuple[str, bool]:
    """NFKC, HTML tags/entities removed, control characters dropped, whitespace collapsed, capped at max_chars.

    Returns (text, truncated)."""
    if value is None or (isinstance(value, float) and value != value):
        return "", False
    text = unicodedata.normalize("NFKC", str(value))
    text = html.unescape(_TAG.sub(" ", text))
    text = "".join(ch if unicodedata.category(ch)[0] != "C" else " " for ch in text)
    text = _WS.sub(" ", text).strip()
    if len(text) > max_chars:
        return text[:max_chars].rstrip(), True
    return text, False


@lru_cache(maxsize=1)
def _jieba():
    import logging

    import jieba

    jieba.setLogLevel(logging.WARNING)
    jieba.initialize()
    return jieba


def _stem(word: str) -> str:
    # Light English suffix stripping: enough to fold plurals and -ing/-ed forms for the word-vector path.
    for suffix in ("ies", "ing", "ed", "es", "s"):
        if word.endswith(suffix) and len(word) - len(suffix) >= 3:
            if suffix == "ies":
                return word[:-3] + "y"
            if suffix == "es" and not word.endswith(("ses", "xes", "zes", "ches", "shes")):
                return word[:-1]
            stem = word[: -len(suffix)]
            if suffix in ("ing", "ed") and len(stem) > 3 and stem[-1] == stem[-2] and stem[-1] not in "lsz":
                stem = stem[:-1]  # running -> run, shopped -> shop
            return stem
    return word


def tokenize(text: str) -> list[str]:
    """Lower-cased word tokens; Chinese runs segmented with jieba; stop words dropped; English stemmed."""
    tokens: list[str] = []
    lowered = text.lower()
    if _CJK.search(lowered):
        pieces = _jieba().lcut(lowered)
    else:
        pieces = [lowered]
    for piece in pieces:
        if _CJK.search(piece):
            word = piece.strip()
            if word and word not in ZH_STOP_WORDS:
                tokens.append(word)
            continue
        for word in _LATIN_WORD.findall(piece):
            if word not in EN_STOP_WORDS:
                tokens.append(_stem(word))
    return tokens
