"""Pronunciation lexicon and its FST L, the Kaldi way (Povey et al., "The Kaldi Speech Recognition
Toolkit", 2011; the recipe of Kaldi's ``utils/prepare_lang.sh``).

The pronunciations are the demo aligner's: pocketsphinx's ``cmudict-en-us.dict`` plus the extra
entries ``modelavg/corpora/align.py`` adds for prompt words the dictionary lacks. Phones carry
their word position (``AH_B``, ``AH_I``, ``AH_E``, ``AH_S``) because the en-us triphones depend
on it; silence has none. Homophones (and pronunciations that are a prefix of another) get
disambiguation symbols ``#1..#n`` so that L∘G can be determinised; ``#0`` passes G's back-off
arcs through. L allows optional silence between words with probability ``sil_prob``.

Example::

    lex = Lexicon.build(["hello", "world"], aligner_dictionary(), base_phones)
    fst = lex.fst(sil_prob=0.5)
"""

from __future__ import annotations

import math
import os
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import kaldifst

from modelavg.decoding.mdef import WPOS_BEGIN, WPOS_END, WPOS_INTERNAL, WPOS_SINGLE
from modelavg.errors import UsageError

SIL = "SIL"
EPS = "<eps>"
BOS, EOS = "<s>", "</s>"
POSITION_SUFFIX = {"_B": WPOS_BEGIN, "_I": WPOS_INTERNAL, "_E": WPOS_END, "_S": WPOS_SINGLE}

Dictionary = dict[str, list[tuple[str, ...]]]


def read_dictionary(path: str | os.PathLike) -> Dictionary:
    """A sphinx dictionary (``word(2) P H O N E S`` lines) as word -> pronunciations."""
    out: Dictionary = {}
    with open(path, encoding="utf-8") as fh:
        for line in fh:
            fields = line.split()
            if len(fields) < 2:
                continue
            word = fields[0].split("(", 1)[0] if fields[0].endswith(")") else fields[0]
            out.setdefault(word, []).append(tuple(fields[1:]))
    return out


def aligner_dictionary() -> Dictionary:
    """The pronunciations the demo corpus was aligned with: cmudict-en-us + the corpus's extras."""
    from modelavg.corpora.align import EXTRA_PRONUNCIATIONS
    from modelavg.decoding.mdef import default_model_dir

    prons = read_dictionary(default_model_dir().parent / "cmudict-en-us.dict")
    for word, phones in EXTRA_PRONUNCIATIONS.items():
        variants = prons.setdefault(word.split("(", 1)[0], [])
        if tuple(phones.split()) not in variants:
            variants.append(tuple(phones.split()))
    return prons


def with_positions(pron: tuple[str, ...]) -> tuple[str, ...]:
    """Word-position-marked phones, as Kaldi's ``prepare_lang.sh --position-dependent-phones``."""
    if len(pron) == 1:
        return (pron[0] + "_S",)
    return (pron[0] + "_B", *(p + "_I" for p in pron[1:-1]), pron[-1] + "_E")


def split_phone(name: str) -> tuple[str, int | None]:
    """``AH_B`` -> (``AH``, begin); ``SIL`` -> (``SIL``, None)."""
    suffix = name[-2:]
    if suffix in POSITION_SUFFIX:
        return name[:-2], POSITION_SUFFIX[suffix]
    return name, None


@dataclass
class Lexicon:
    """Entries (word, position-marked pronunciation, disambiguation symbol or 0) and symbols."""

    entries: list[tuple[str, tuple[str, ...], int]]
    phones: list[str]  # phones.txt order: <eps>, SIL, X_B/X_E/X_I/X_S..., #0..#n
    words: list[str]  # words.txt order: <eps>, words..., #0, <s>, </s>

    @classmethod
    def build(cls, words: Iterable[str], prons: Dictionary, base_phones: list[str]) -> Lexicon:
        """Every pronunciation of each word in ``words`` that ``prons`` has; others are skipped."""
        known = sorted({w for w in words if w in prons and w not in (BOS, EOS)})
        if not known:
            raise UsageError("no word of the language model has a pronunciation")
        base = set(base_phones)
        plain = [(w, with_positions(p)) for w in known for p in prons[w] if set(p) <= base]
        entries, num_disambig = _add_disambig(plain)
        phones = [EPS, SIL] + [f"{p}{s}" for p in base_phones for s in ("_B", "_E", "_I", "_S")]
        phones += [f"#{k}" for k in range(num_disambig + 1)]
        words_out = [EPS, *sorted({w for w, _, _ in entries}), "#0", BOS, EOS]
        return cls(entries, phones, words_out)

    @property
    def disambig_phone_ids(self) -> list[int]:
        return [i for i, p in enumerate(self.phones) if p.startswith("#")]

    def fst(self, sil_prob: float = 0.5) -> kaldifst.StdVectorFst:
        """L with optional silence (Kaldi's ``make_lexicon_fst.py --sil-prob``) and a #0 loop."""
        pid = {p: i for i, p in enumerate(self.phones)}
        wid = {w: i for i, w in enumerate(self.words)}
        sil_cost, nosil_cost = -math.log(sil_prob), -math.log(1.0 - sil_prob)
        start, loop, sil_state = 0, 1, 2
        lines = [
            f"{start} {loop} 0 0 {nosil_cost}",
            f"{start} {sil_state} 0 0 {sil_cost}",
            f"{sil_state} {loop} {pid[SIL]} 0",
        ]
        next_state = 3
        for word, pron, disambig in self.entries:
            symbols = [pid[p] for p in pron] + ([pid[f"#{disambig}"]] if disambig else [])
            cur, out = loop, wid[word]
            for sym in symbols[:-1]:
                lines.append(f"{cur} {next_state} {sym} {out}")
                cur, out, next_state = next_state, 0, next_state + 1
            lines.append(f"{cur} {loop} {symbols[-1]} {out} {nosil_cost}")
            lines.append(f"{cur} {sil_state} {symbols[-1]} {out} {sil_cost}")
        lines.append(f"{loop}")
        fst = kaldifst.compile("\n".join(lines) + "\n")
        kaldifst.add_self_loops(fst, [pid["#0"]], [wid["#0"]])
        kaldifst.arcsort(fst, sort_type="olabel")
        return fst

    def write(self, out_dir: str | os.PathLike) -> None:
        """phones.txt, words.txt and lexicon.txt (with positions and disambiguation symbols)."""
        from modelavg.io import atomic_write_bytes

        out = Path(out_dir)
        for name, symbols in (("phones.txt", self.phones), ("words.txt", self.words)):
            text = "".join(f"{s} {i}\n" for i, s in enumerate(symbols))
            atomic_write_bytes(text.encode(), out / name)
        lex = "".join(
            f"{w} {' '.join(p)}{f' #{d}' if d else ''}\n" for w, p, d in self.entries
        ).encode()
        atomic_write_bytes(lex, out / "lexicon.txt")


def _add_disambig(
    entries: list[tuple[str, tuple[str, ...]]],
) -> tuple[list[tuple[str, tuple[str, ...], int]], int]:
    """Kaldi's ``add_lex_disambig.pl``: #k on homophones and on prefixes of other prons."""
    count = Counter(p for _, p in entries)
    prefixes = {p[:i] for _, p in entries for i in range(1, len(p))}
    last: dict[tuple[str, ...], int] = {}
    out, top = [], 0
    for word, pron in entries:
        if count[pron] > 1 or pron in prefixes:
            last[pron] = last.get(pron, 0) + 1
            top = max(top, last[pron])
            out.append((word, pron, last[pron]))
        else:
            out.append((word, pron, 0))
    return out, top
