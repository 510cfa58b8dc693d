"""Forced alignment with pocketsphinx: one senone and one phone per 10 ms frame, plus features.

The paper trains on GMM-HMM state (senone) alignments; offline, pocketsphinx's bundled en-us model
gives them for any transcript whose words it can pronounce. Per utterance:

* The decoder aligns in two passes (words, then states) with beams wider than its defaults.
* Its front end keeps state (CMN etc.) between utterances; it is reset before each one, so that
  alignments depend neither on processing order nor on the number of worker processes.
* The aligner's labels are kept as they are. Features with fewer frames (by at most
  ``MAX_FRAME_MISMATCH``) are padded by repeating their last frame; extra feature frames are
  dropped. A larger mismatch fails the utterance.

Example::

    for result in align_all([AlignJob("utt1", "utt1.wav", "hello world")], 2, progress=False):
        result.senones, result.phones, result.feats
"""

from __future__ import annotations

import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from modelavg.corpora.audio import SAMPLE_RATE, fbank, load_audio_16k

MAX_FRAME_MISMATCH = 2
# Wider than pocketsphinx's defaults (1e-48, 1e-40, 1e-48): forced alignment has a single path, so
# a wide beam costs little, and the defaults lose the path on a few long or quiet prompts.
DECODER_BEAMS = {"beam": 1e-80, "wbeam": 1e-60, "pbeam": 1e-80}
# Words of the bundled transcripts missing from the CMU dictionary (ARPAbet, as en-us expects).
EXTRA_PRONUNCIATIONS = {
    "backtick": "B AE K T IH K",
    "caret": "K EH R AH T",
    "dahdi": "D AA D IY",
    "digium": "D IH JH IY AH M",
    "forevermore": "F ER EH V ER M AO R",
    "iax": "IY K S",
    "iax(2)": "AY EY EH K S",
    "prepend": "P R IY P EH N D",
    "prepending": "P R IY P EH N D IH NG",
    "rerecord": "R IY R IH K AO R D",
    "semicolon": "S EH M IY K OW L AH N",
    "undelete": "AH N D IH L IY T",
    "undeleted": "AH N D IH L IY T IH D",
    "unistim": "Y UW N IH S T IH M",
    "unmute": "AH N M Y UW T",
    "unmuted": "AH N M Y UW T IH D",
    "waldo's": "W AO L D OW Z",
}


@dataclass
class AlignJob:
    utt: str
    wav: str
    text: str


@dataclass
class Aligned:
    """An utterance's features and per-frame labels, or the reason it could not be aligned."""

    utt: str
    failure: str | None = None
    feats: np.ndarray | None = None
    senones: np.ndarray | None = None
    phones: list[str] | None = None


_DECODER = None


def _new_decoder():
    """Alignment decoder with the bundled en-us model and our extra pronunciations."""
    from pocketsphinx import Decoder

    decoder = Decoder(samprate=SAMPLE_RATE, bestpath=False, loglevel="FATAL", **DECODER_BEAMS)
    words = list(EXTRA_PRONUNCIATIONS.items())
    for i, (word, phones) in enumerate(words):
        decoder.add_word(word, phones, update=i == len(words) - 1)
    return decoder


def _init_worker() -> None:
    global _DECODER
    _DECODER = _new_decoder()


def _decode(decoder, audio: bytes) -> None:
    decoder.start_utt()
    decoder.process_raw(audio, full_utt=True)
    decoder.end_utt()


def align(decoder, samples: np.ndarray, text: str) -> tuple[np.ndarray, list[str]] | str:
    """Per-frame senone ids and phone names, or the reason the alignment failed."""
    audio = samples.tobytes()
    decoder.reinit_feat()  # drop front-end state (CMN etc.) left by the previous utterance
    try:
        decoder.set_align_text(text)
        _decode(decoder, audio)
        if decoder.hyp() is None:
            return "alignment failed (no path through the transcript)"
        decoder.set_alignment()
        _decode(decoder, audio)
        alignment = decoder.get_alignment()
    except RuntimeError as exc:
        return f"alignment failed ({exc})"
    if alignment is None:
        return "alignment failed (no state alignment)"
    senones: list[int] = []
    phones: list[str] = []
    for word in alignment:
        for phone in word:
            for state in phone:
                if state.start != len(senones):
                    return "alignment failed (gap between states)"
                senones.extend([int(state.name)] * state.duration)
                phones.extend([phone.name] * state.duration)
    if not senones:
        return "alignment failed (empty)"
    return np.asarray(senones, dtype=np.int64), phones


def match_frames(feats: np.ndarray, num_labels: int) -> np.ndarray | None:
    """Fit features to the alignment's length: pad with the last frame or trim the end."""
    diff = num_labels - len(feats)
    if abs(diff) > MAX_FRAME_MISMATCH or len(feats) == 0:
        return None
    if diff > 0:
        return np.concatenate([feats, np.repeat(feats[-1:], diff, axis=0)])
    return feats[:num_labels]


def _process(job: AlignJob) -> Aligned:
    decoder = _DECODER if _DECODER is not None else _new_decoder()
    oov = [w for w in job.text.split() if decoder.lookup_word(w) is None]
    if oov:
        return Aligned(job.utt, failure=f"out-of-vocabulary words ({' '.join(sorted(set(oov)))})")
    samples = load_audio_16k(job.wav)
    aligned = align(decoder, samples, job.text)
    if isinstance(aligned, str):
        return Aligned(job.utt, failure=aligned)
    senones, phones = aligned
    feats = match_frames(fbank(samples), len(senones))
    if feats is None:
        return Aligned(job.utt, failure="frame count mismatch between features and alignment")
    return Aligned(job.utt, feats=feats, senones=senones, phones=phones)


def align_all(jobs: list[AlignJob], num_workers: int, progress: bool) -> Iterator[Aligned]:
    """Align in a worker pool, longest files first (results carry their utt, so order is free)."""
    from tqdm import tqdm

    order = sorted(jobs, key=lambda j: (-Path(j.wav).stat().st_size, j.utt))
    bar = tqdm(total=len(order), desc="aligning", unit="utt", disable=not progress, file=sys.stderr)
    try:
        if num_workers <= 1:
            _init_worker()
            for job in order:
                yield _process(job)
                bar.update()
            return
        import multiprocessing as mp

        method = "fork" if "fork" in mp.get_all_start_methods() else "spawn"
        with mp.get_context(method).Pool(num_workers, initializer=_init_worker) as pool:
            for result in pool.imap(_process, order, chunksize=1):
                yield result
                bar.update()
    finally:
        bar.close()
