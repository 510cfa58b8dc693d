"""Word error rate: (insertions + deletions + substitutions) / reference words, as Kaldi's
``compute-wer`` counts them (one minimum-edit alignment per utterance, kaldialign).

Example::

    score({"u1": "a b c".split()}, {"u1": "a c d".split()})
    # {"wer": 0.667, "ins": 1, "del": 1, "sub": 0, "words": 3, "utts": 1, "sentence_errors": 1}
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import kaldialign

WER_KEYS = ("wer", "ins", "del", "sub", "words", "sentence_errors", "utts")  # what score returns


def score(refs: Mapping[str, Sequence[str]], hyps: Mapping[str, Sequence[str]]) -> dict:
    """WER over the reference utterances; a missing hypothesis counts as empty (all deleted)."""
    totals = {"ins": 0, "del": 0, "sub": 0, "words": 0, "sentence_errors": 0}
    for utt, ref in refs.items():
        d = kaldialign.edit_distance(list(ref), list(hyps.get(utt, ())))
        for key in ("ins", "del", "sub"):
            totals[key] += d[key]
        totals["words"] += len(ref)
        totals["sentence_errors"] += d["total"] > 0
    errors = totals["ins"] + totals["del"] + totals["sub"]
    return {"wer": errors / max(totals["words"], 1), **totals, "utts": len(refs)}


def format_wer(name: str, r: Mapping) -> str:
    """``name: WER 26.36% [58 / 220, 9 ins, 12 del, 37 sub] over 55 utterances``."""
    errors = r["ins"] + r["del"] + r["sub"]
    return (
        f"{name}: WER {100 * r['wer']:.2f}% [{errors} / {r['words']}, {r['ins']} ins, "
        f"{r['del']} del, {r['sub']} sub] over {r['utts']} utterances"
    )
