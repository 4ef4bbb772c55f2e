"""Text normalisation and word tokens for English and Chinese product text."""
from __future__ import annotations

import html
import re
import unicodedata
from functools import lru_cache
from typing import Callable

# An HTML tag, comment or declaration: "<" then a letter, "/", "!" or "?". A "<" before a digit or a space is text
# ("Voltage <12V, current >2A" keeps both halves).
# An unclosed comment runs to the end, as in a browser: searched for its end from each "<!--" again, it took
# quadratic time ("<!--" repeated).
_TAG = re.compile(r"<!--(?:.*?-->|.*)|<[/!?]?[A-Za-z][^<>]*>", re.DOTALL)
# A "<word>" is markup only where HTML would make it so: a tag with attributes, an element's name that may stand
# unclosed ("<br>", "<p>"), is self-closed or closed in the same field ("<b>..</b>"), a closing tag of an element, a
# lower-case namespaced or custom name (Word's "<o:p>", "<x-icon>"); a comment or declaration always is. Sizes and
# labels are text: "T-shirt <S>", "<M>", "<X-Large>", "<Size:XL>".
_HTML_ELEMENTS = frozenset((
    "a abbr address area article aside audio b base bdi bdo big blink blockquote body br button canvas caption "
    "center cite code col colgroup data datalist dd del details dfn dialog div dl dt em embed fieldset figcaption "
    "figure font footer form frame frameset h1 h2 h3 h4 h5 h6 head header hgroup hr html i iframe img input ins kbd "
    "label legend li link main map mark marquee menu meta meter nav nobr noscript object ol optgroup option output "
    "p param picture pre progress q rp rt ruby s samp script section select small source span strike strong style "
    "sub summary sup svg table tbody td template textarea tfoot th thead time title tr track tt u ul var video "
    "wbr").split())
# Elements HTML lets stand unclosed: void ones, and those whose end tag may be left out ("<li>a<li>b", "<p>").
_UNCLOSED_ELEMENTS = frozenset("area base br col embed hr img input link meta param source track wbr p li dt dd tr td "
                               "th thead tbody tfoot option optgroup colgroup rt rp html head body".split())
_ATTRIBUTE = re.compile(r"\s[A-Za-z_:][\w.:-]*\s*=")
_TAG_NAME = re.compile(r"</?([A-Za-z][\w.:-]*)")
_CLOSING_NAME = re.compile(r"</([A-Za-z][\w.:-]*)")
_ATTRIBUTED_NAME = re.compile(r"<([A-Za-z][\w.:-]*)\s[^<>=]*=")


def _markup_remover(field: str) -> Callable[[re.Match], str]:
    """The _TAG replacement for one field: markup becomes a space, a word in angle brackets stays."""
    closed = {name.lower() for name in _CLOSING_NAME.findall(field)}
    attributed = {name.lower() for name in _ATTRIBUTED_NAME.findall(field)}

    def removed(m: re.Match) -> str:
        tag = m.group()
        if tag[1] in "!?":
            return " "
        name = _TAG_NAME.match(tag).group(1)
        lower = name.lower()
        if (name == lower and (":" in name or "-" in name)) or _ATTRIBUTE.search(tag):
            return " "
        if tag[1] == "/":  # the end of an element, or of a tag given attributes in this field ("<m size=3>..</m>")
            return " " if lower in _HTML_ELEMENTS or lower in attributed else tag
        if lower not in _HTML_ELEMENTS:
            return tag
        return " " if lower in _UNCLOSED_ELEMENTS or lower in closed or tag.endswith("/>") else tag

    return removed


# Markup may outweigh the text it holds many times over, but not without end: past this the field is cut first.
_RAW_CHARS_PER_CHAR, _RAW_CHARS_LEAST = 64, 1 << 20
_WS = re.compile(r"\s+")
# Code and style in an HTML description are no text of the product; a CDATA section's content is.
_CODE_OPEN = re.compile(r"<(script|style)\b[^<>]*>", re.IGNORECASE)
_CDATA_OPEN, _CDATA_CLOSE = "<![CDATA[", "]]>"


def _cdata_unwrapped(text: str) -> str:
    """Each CDATA section's content in place of the section; one never closed is left as it is, and so is all
    after it (a search for its end from every later opening would be quadratic)."""
    pieces, at = [], 0
    while (opened := text.find(_CDATA_OPEN, at)) >= 0:
        close = text.find(_CDATA_CLOSE, opened + len(_CDATA_OPEN))
        if close < 0:
            break
        pieces += [text[at:opened], text[opened + len(_CDATA_OPEN):close]]
        at = close + len(_CDATA_CLOSE)
    return "".join(pieces) + text[at:] if pieces else text


def _without_code(text: str) -> str:
    """`text` without its <script> and <style> elements (from the opening tag to the closing one; one never closed
    is left to the tag remover, and what follows it kept), and with each CDATA section's content in place of the
    section. Each closing tag is found by one scan forward: linear in the text's length."""
    if "<" not in text:
        return text
    text = _cdata_unwrapped(text)
    lower, pieces, at = text.lower(), [], 0
    while (opened := _CODE_OPEN.search(text, at)) is not None:
        close = lower.find(f"</{opened.group(1).lower()}", opened.end())
        if close < 0:
            break
        end = lower.find(">", close)
        pieces += [text[at:opened.start()], " "]
        at = len(text) if end < 0 else end + 1
    return "".join(pieces) + text[at:] if pieces else text


_CJK = re.compile(r"[\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff]")


def _class_ranges(codes: list[int]) -> str:
    """Code points (ascending) as the inside of a regex character class, in ranges, each an escape."""
    ranges, start = [], codes[0]
    for prev, c in zip(codes, codes[1:] + [-1]):
        if c != prev + 1:
            ranges.append(f"\\U{start:08x}-\\U{prev:08x}" if prev > start else f"\\U{start:08x}")
            start = c
    return "".join(ranges)


def _combining_marks() -> str:
    """The combining marks (Unicode M*) as a character class's ranges: Devanagari's vowel signs, Thai's tone marks,
    Hebrew's points sit inside words, and are not "word" characters to `re`."""
    return _class_ranges([c for c in range(0x110000) if unicodedata.category(chr(c))[0] == "M"])


@lru_cache(maxsize=1)
def _word() -> re.Pattern:
    """A word of any script ("crème", "größe", "كرسي", "कुर्सी"); built on first use, not at every import (the marks'
    class scans every code point)."""
    letter = rf"[^\W_]|[{_combining_marks()}]"
    return re.compile(rf"(?:{letter})+(?:['\-](?:{letter})+)*")

EN_STOP_WORDS = frozenset(
    "a an and are as at be by for from has have in is it its of on or that the this to was were with".split()
)
ZH_STOP_WORDS = frozenset("的 了 和 是 在 与 及 或 就 都 而 也 又 之 其 这 那 有 为 款 新款".split())


_SURROGATE = re.compile("[\ud800-\udfff]")
_LINE_BREAKS = frozenset("\t\n\r")


def first_undecodable(value: str) -> int:
    """Position of the first character that is not text: a byte that was not valid UTF-8 (read with
    surrogateescape, it arrives as U+DC80..U+DCFF) or a lone surrogate (a JSON "\\ud800" escape); -1 if none."""
    m = _SURROGATE.search(value)
    return m.start() if m else -1


def escape_undecodable(value: str) -> str:
    """`value` made storable as UTF-8: each undecodable byte written as \\xNN, any other lone surrogate as
    \\uNNNN, so the quarantine keeps the raw bytes visibly."""
    def escape(m: re.Match) -> str:
        code = ord(m.group())
        return f"\\x{code - 0xDC00:02x}" if 0xDC80 <= code <= 0xDCFF else f"\\u{code:04x}"

    return _SURROGATE.sub(escape, value)


def control_category(ch: str) -> str | None:
    """A control, format, private-use or surrogate character's category, else None. An unassigned character (an
    emoji newer than this Python's Unicode tables) is text."""
    category = unicodedata.category(ch)
    return category if category[0] == "C" and category != "Cn" else None


def has_control_characters(value: str) -> bool:
    """Control or format characters (NUL, escape, a byte-order mark...) other than tab and line breaks."""
    return _controls()[2].search(value) is not None


_ZERO_WIDTH_SPACE = "\u200b"  # a format character that marks a word boundary


@lru_cache(maxsize=1)
def _controls() -> tuple[re.Pattern, re.Pattern, re.Pattern]:
    """(format characters, the other controls, controls but tab and line breaks) as patterns over this Python's
    Unicode tables: a long field is then cleaned in C, not a character at a time (built on first use: it scans
    every code point)."""
    dropped, parting, flagged = [], [], []
    for c in range(0x110000):
        category = control_category(chr(c))
        if category is None:
            continue
        (dropped if category == "Cf" and chr(c) != _ZERO_WIDTH_SPACE else parting).append(c)
        if chr(c) not in _LINE_BREAKS:
            flagged.append(c)
    return (re.compile(f"[{_class_ranges(dropped)}]+"), re.compile(f"[{_class_ranges(parting)}]+"),
            re.compile(f"[{_class_ranges(flagged)}]"))


def _without_controls(text: str) -> str:
    """A format character (a soft hyphen, a zero-width joiner, a direction mark) goes without a trace: it sits inside
    a word ("Blue\u00adberry") or an emoji sequence; a control or private-use character parts words as a space."""
    dropped, parting, _ = _controls()
    return parting.sub(" ", dropped.sub("", text))


def normalize_text(value: object, max_chars: int) -> tuple[str, bool]:
    """NFKC, HTML tags/entities removed, control characters dropped, whitespace collapsed, capped at max_chars.

    Returns (text, truncated)."""
    if value is None or (isinstance(value, float) and value != value):
        return "", False
    text = str(value)
    raw_cap = max(_RAW_CHARS_PER_CHAR * max_chars, _RAW_CHARS_LEAST)
    cut = len(text) > raw_cap
    # Cut again after NFKC: one character may become 18 (U+FDFA), so a capped field could still grow past the cap.
    text = unicodedata.normalize("NFKC", text[:raw_cap])
    cut = cut or len(text) > raw_cap
    text = text[:raw_cap]
    # Tags removed again after the entities: exports escape HTML twice ("&lt;b&gt;Bold&lt;/b&gt;").
    text = _without_code(text)
    text = _TAG.sub(_markup_remover(text), text)
    text = html.unescape(text)
    text = _without_code(text)
    text = _TAG.sub(_markup_remover(text), text)
    text = _without_controls(text)
    text = _WS.sub(" ", text).strip()
    if len(text) > max_chars:
        return text[:max_chars].rstrip(), True
    return text, cut


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
        for word in _word().findall(piece):
            if word not in EN_STOP_WORDS:
                tokens.append(_stem(word))
    return tokens
