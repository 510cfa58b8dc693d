"""Transcripts: the prompt files' formats and their spoken form as a word string an aligner can use.

The Asterisk prompt transcripts describe rather than spell what is said: "[beep tone]", "press *",
"dial 2", "28.8", typos. ``normalize_text`` turns them into lower-case words in the CMU dictionary's
spelling; the demo corpus aligns that string, and the synthetic corpus draws its vocabulary from it.

Example::

    normalize_text("press * to toggle pause")  # "press star to toggle pause"
"""

from __future__ import annotations

import gzip
import re
from pathlib import Path

# Phrases rewritten in the lower-cased transcript before tokenising (the prompt's spoken form).
PHRASE_SUBSTITUTIONS = {
    "www.asterisk.org": "w w w dot asterisk dot org",
    "h.323": "h three two three",
    "un-indentified": "unidentified",
    "3d": "three d",
    "*": " star ",
    "#": " pound ",
}
# Tokens rewritten after tokenising: typos, compounds and digit strings read digit by digit.
WORD_SUBSTITUTIONS = {
    "500": "five zero zero",
    "600": "six zero zero",
    "1234": "one two three four",
    "4242": "four two four two",
    "8500": "eight five zero zero",
    "exclaimation": "exclamation",
    "fourtieth": "fortieth",
    "represenatives": "representatives",
    "witheld": "withheld",
    "umute": "unmute",
    "xray": "x ray",
    "lowercase": "lower case",
    "uppercase": "upper case",
    "touchtone": "touch tone",
    "ivr": "i v r",
    "pbx": "p b x",
    "mgcp": "m g c p",
}

_ONES = [
    "zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten",
    "eleven", "twelve", "thirteen", "fourteen", "fifteen", "sixteen", "seventeen", "eighteen",
    "nineteen",
]  # fmt: skip
_TENS = ["", "", "twenty", "thirty", "forty", "fifty", "sixty", "seventy", "eighty", "ninety"]


def number_to_words(n: int) -> str:
    """Spell a non-negative integer below a million the way the prompts read numbers."""
    if n < 20:
        return _ONES[n]
    if n < 100:
        return _TENS[n // 10] + ("" if n % 10 == 0 else " " + _ONES[n % 10])
    if n < 1000:
        rest = n % 100
        return _ONES[n // 100] + " hundred" + ("" if rest == 0 else " " + number_to_words(rest))
    if n < 1_000_000:
        rest = n % 1000
        head = number_to_words(n // 1000) + " thousand"
        return head + ("" if rest == 0 else " " + number_to_words(rest))
    raise ValueError(f"number too large to spell: {n}")


def _spell_token(token: str) -> str:
    if token in WORD_SUBSTITUTIONS:
        return WORD_SUBSTITUTIONS[token]
    if token.isdigit():
        return number_to_words(int(token))
    return token


def normalize_text(text: str) -> str:
    """Turn a prompt transcript into the aligner's word string ("" if nothing is spoken).

    Bracketed descriptions ("[beep tone]", "(10 seconds of silence)") are not speech and go;
    symbols become their spoken names, decimals are read "x point y", other punctuation goes.
    """
    text = text.lower()
    text = re.sub(r"\[[^\]]*\]|\([^)]*\)|<[^>]*>", " ", text)
    for phrase, spoken in PHRASE_SUBSTITUTIONS.items():
        text = text.replace(phrase, spoken)
    text = re.sub(
        r"(\d+)\.(\d+)",
        lambda m: f"{m.group(1)} point {' '.join(m.group(2))}",
        text,
    )
    text = re.sub(r"[^a-z0-9']+", " ", text)
    words = (_spell_token(tok.strip("'")) for tok in text.split())
    return " ".join(" ".join(w.split()) for w in words if w.strip())


def read_asterisk_transcripts(path: Path) -> dict[str, str]:
    """Read ``name: text`` lines of the Asterisk transcript file (gzip or plain)."""
    opener = gzip.open if path.suffix == ".gz" else open
    prompts: dict[str, str] = {}
    with opener(path, "rt", encoding="utf-8") as f:
        for line in f:
            line = line.strip()
            if not line or line.startswith(";") or ": " not in line:
                continue
            name, text = line.split(": ", 1)
            prompts[name.strip()] = text.strip()
    return prompts


def read_sphinx_transcripts(path: Path) -> dict[str, str]:
    """Read Sphinx-style ``<s> words </s> (utt)`` lines as utt -> lower-case words."""
    prompts: dict[str, str] = {}
    for line in path.read_text(encoding="utf-8").splitlines():
        m = re.match(r"\s*(.*?)\s*\((\S+)\)\s*$", line)
        if m:
            words = [w for w in m.group(1).split() if w not in ("<s>", "</s>")]
            prompts[m.group(2)] = " ".join(words).lower()
    return prompts
