"""Real speech demo corpus: Asterisk telephone prompts force-aligned to senones with pocketsphinx.

The paper trains on GMM-HMM state (senone) alignments of real speech. Offline, the closest real
material is the Asterisk English prompt set (one female speaker, 8 kHz, CC-BY-SA-3.0): its
transcripts are normalised (``corpora.text``), force-aligned with pocketsphinx's bundled en-us
model to one senone and one phone per 10 ms frame (``corpora.align``) and turned into 40-dim
log-mel filterbanks (``corpora.audio``) in Kaldi data directories. Five LibriVox utterances from
pocketsphinx-testdata (another speaker) form a cross-speaker ``test_other`` set.

Classes are all senones seen in any aligned utterance (all splits and ``test_other``), numbered in
increasing senone id. Senones unseen in training therefore keep their own class (never predicted
well by a model trained on ``train``, which is the honest outcome) instead of being merged into a
neighbour; the counts of such frames are reported. These choices are written to the corpus README.

Example::

    counts = prepare_demo("data/demo", num_workers=2)
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable
from pathlib import Path

import numpy as np

from modelavg.corpora.align import MAX_FRAME_MISMATCH, Aligned, AlignJob, align_all
from modelavg.corpora.audio import MEL_HIGH_FREQ, MEL_LOW_FREQ, NUM_MEL_BINS
from modelavg.corpora.datadir import split_utts, write_lines, write_split
from modelavg.corpora.text import normalize_text, read_asterisk_transcripts, read_sphinx_transcripts
from modelavg.errors import UsageError
from modelavg.io import atomic_write_bytes

ASTERISK_WAV_DIR = Path("/usr/share/asterisk/sounds/en_US_f_Allison")
ASTERISK_TRANSCRIPT = Path("/usr/share/doc/asterisk-core-sounds-en/core-sounds-en.txt.gz")
LIBRIVOX_DIR = Path("/usr/share/pocketsphinx/test/data/librivox")
APT_INSTALL = (
    "apt-get install -y asterisk-core-sounds-en-wav asterisk-core-sounds-en pocketsphinx-testdata"
)
PIP_INSTALL = "pip install pocketsphinx kaldi-native-fbank soundfile scipy"
ASTERISK_SPEAKER = "allison"
LIBRIVOX_SPEAKER = "librivox"


def _check_dependencies() -> None:
    """Fail early, naming the install command, when a speech package is missing."""
    missing = []
    # scipy.signal is slow to import: importing it here also spares each forked worker the cost
    for module in ("pocketsphinx", "kaldi_native_fbank", "soundfile", "scipy.signal", "tqdm"):
        try:
            __import__(module)
        except ImportError:
            missing.append(module)
    if missing:
        raise UsageError(f"python module(s) {', '.join(missing)} missing; run: {PIP_INSTALL}")


def _check_inputs() -> None:
    for path in (ASTERISK_WAV_DIR, ASTERISK_TRANSCRIPT, LIBRIVOX_DIR / "transcription"):
        if not Path(path).exists():
            raise UsageError(f"{path}: not found; run: {APT_INSTALL}")


def utt_id(speaker: str, name: str) -> str:
    """Kaldi utterance ids start with the speaker and hold no '/'."""
    return f"{speaker}-{name.replace('/', '-')}"


def _subset(names: list[str], max_utts: int | None) -> list[str]:
    """Evenly spaced deterministic subset, so a small run still samples the whole prompt set."""
    if max_utts is None or max_utts >= len(names):
        return names
    if max_utts < 1:
        raise UsageError(f"max_utts: must be at least 1, got {max_utts}")
    idx = np.unique(np.linspace(0, len(names) - 1, max_utts).round().astype(int))
    return [names[i] for i in idx]


def _asterisk_jobs(max_utts: int | None) -> tuple[list[AlignJob], dict[str, str], int]:
    """Jobs for prompts with audio and speech, failures (utt -> reason) and the prompt count."""
    prompts = read_asterisk_transcripts(Path(ASTERISK_TRANSCRIPT))
    names = _subset(sorted(prompts), max_utts)
    jobs, failed = [], {}
    for name in names:
        utt = utt_id(ASTERISK_SPEAKER, name)
        wav = Path(ASTERISK_WAV_DIR) / f"{name}.wav"
        text = normalize_text(prompts[name])
        if not wav.exists():
            failed[utt] = "no audio file"
        elif not text:
            failed[utt] = "no speech (tone or silence prompt)"
        else:
            jobs.append(AlignJob(utt, str(wav), text))
    return jobs, failed, len(names)


def _librivox_jobs() -> list[AlignJob]:
    prompts = read_sphinx_transcripts(Path(LIBRIVOX_DIR) / "transcription")
    return [
        AlignJob(utt_id(LIBRIVOX_SPEAKER, name), str(Path(LIBRIVOX_DIR) / f"{name}.wav"), text)
        for name, text in sorted(prompts.items())
    ]


def build_class_map(results: Iterable[Aligned]) -> tuple[list[int], dict[int, str], list[str]]:
    """Sorted senone ids, senone -> phone, sorted phone names, over every aligned utterance."""
    senone_phone: dict[int, str] = {}
    for r in results:
        for s, p in zip(r.senones.tolist(), r.phones, strict=True):
            if senone_phone.setdefault(s, p) != p:
                raise RuntimeError(f"senone {s} aligned to phones {senone_phone[s]} and {p}")
    return sorted(senone_phone), senone_phone, sorted(set(senone_phone.values()))


def _split_counts(results: list[Aligned], train_senones: set[int]) -> dict[str, int]:
    senones = np.concatenate([r.senones for r in results]) if results else np.zeros(0, int)
    return {
        "utterances": len(results),
        "frames": int(len(senones)),
        "senones": int(len(np.unique(senones))),
        "phones": len({p for r in results for p in r.phones}),
        "frames_unseen_in_train": int(sum(s not in train_senones for s in senones.tolist())),
    }


def _failure_kind(reason: str) -> str:
    return reason.split(" (", 1)[0]


def _print_counts(counts: dict) -> None:
    print(
        f"demo corpus in {counts['out_dir']}: {counts['classes']} senone classes, "
        f"{counts['phones']} phones, {counts['aligned']} of {counts['prompts']} prompts aligned"
    )
    for name, c in counts["splits"].items():
        print(
            f"  {name:10s} {c['utterances']:4d} utts {c['frames']:7d} frames "
            f"{c['senones']:5d} senones {c['phones']:3d} phones "
            f"({c['frames_unseen_in_train']} frames of senones unseen in train)"
        )
    for reason, n in counts["failed"].items():
        print(f"  failed: {n:4d} {reason}")


def _readme(counts: dict, seed: int) -> str:
    rows = "\n".join(
        f"| {name} | {c['utterances']} | {c['frames']} | {c['senones']} | {c['phones']} | "
        f"{c['frames_unseen_in_train']} |"
        for name, c in counts["splits"].items()
    )
    failures = "\n".join(f"- {n} {reason}" for reason, n in counts["failed"].items()) or "- none"
    return f"""# Demo speech corpus (frame-level senone targets)

Generated by `modelavg.corpora.asterisk.prepare_demo` (seed {seed}).
{counts["aligned"]} of {counts["prompts"]} Asterisk prompts aligned.
{counts["classes"]} senone classes ({counts["classes_unseen_in_train"]} unseen in train), \
{counts["phones"]} phones.

| split | utterances | frames | senones | phones | frames of senones unseen in train |
|---|---|---|---|---|---|
{rows}

Failed prompts (listed in `failed.txt`):
{failures}

## Sources and licences

- `train`, `cv`, `test`: the English Asterisk core prompts recorded by Allison Smith (Debian
  packages `asterisk-core-sounds-en-wav` for the audio, `asterisk-core-sounds-en` for
  `core-sounds-en.txt.gz`), 8 kHz 16-bit, one female speaker. Licence CC-BY-SA-3.0
  (Copyright 2003-2010 Allison Smith, financial contributions by Digium, Inc.). This corpus is a
  derivative work (resampled, filterbank features, machine alignments) under the same licence.
- `test_other`: the five LibriVox utterances ("Sense and Sensibility", another speaker, 16 kHz)
  shipped in Debian `pocketsphinx-testdata`, whose copyright file covers the package under
  BSD-2-Clause (Carnegie Mellon University); LibriVox recordings are public domain.

## How it was made

1. Transcripts normalised for the aligner: lower case, bracketed descriptions of tones and
   silence dropped (those prompts fail as "no speech"), `*`/`#` read "star"/"pound", numbers
   spelled out, punctuation removed, a small substitution map for typos and acronyms
   (`modelavg/corpora/text.py`) and a few added pronunciations for out-of-vocabulary words
   (`modelavg/corpora/align.py`).
2. Audio upsampled 8 -> 16 kHz (`scipy.signal.resample_poly`), forced-aligned with pocketsphinx's
   bundled en-us model (two passes: words, then states); every 10 ms frame gets the senone id
   (tied HMM state) and base phone it was aligned to. The front end is reset per utterance.
3. Features: {NUM_MEL_BINS}-dim log-mel filterbank (kaldi-native-fbank, 25 ms window, 10 ms
   shift, no dither, mel band {MEL_LOW_FREQ:g}-{MEL_HIGH_FREQ:g} Hz, the telephone band). No
   normalisation is applied. When the feature matrix is shorter than the alignment (by at most
   {MAX_FRAME_MISMATCH} frames) its last frame is repeated; extra feature frames are dropped.
4. Split: the aligned Asterisk utterances, sorted by id, are permuted with
   `numpy.random.default_rng({seed})`; 10% go to `test`, 10% to `cv`, the rest to `train`.
   All three share one speaker and recording session, and many prompts share phrases, so `test`
   measures within-speaker generalisation; `test_other` measures a new speaker and channel.
5. Classes: every senone seen in any aligned utterance (including `test_other`), numbered by
   increasing senone id. A senone missing from `train` keeps its own class; such frames are
   counted in the table above (a model trained on `train` cannot learn them).

## Files

- `classes.txt`: `class_id senone_id phone` (targets are class ids 0..C-1).
- `phones.txt`: `phone_id phone` (`phones.ark` holds per-frame phone ids).
- `failed.txt`: `utterance reason` for each prompt that was not aligned.
- per split: `feats.scp/ark` (float32 frames x {NUM_MEL_BINS}), `targets.scp/ark` and
  `phones.scp/ark` (int32 per frame), `text` (the aligned word string), `utt2spk`, `spk2utt`.
"""


def prepare_demo(
    out_dir: str | Path = "data/demo",
    max_utts: int | None = None,
    seed: int = 0,
    progress: bool = True,
    num_workers: int = 2,
) -> dict:
    """Build the demo corpus under ``out_dir`` and return (and print) its counts.

    ``max_utts`` takes an evenly spaced subset of the prompts (for quick tests). The same
    inputs give byte-identical ark files, whatever ``num_workers``.
    """
    _check_dependencies()
    _check_inputs()
    out = Path(out_dir)
    jobs, failed, num_prompts = _asterisk_jobs(max_utts)
    other_jobs = _librivox_jobs()
    texts = {j.utt: j.text for j in jobs + other_jobs}
    results = {r.utt: r for r in align_all(jobs + other_jobs, num_workers, progress)}
    for utt, r in results.items():
        if r.failure is not None:
            failed[utt] = r.failure
    aligned = [r for r in results.values() if r.failure is None]
    if not any(r.utt.startswith(ASTERISK_SPEAKER) for r in aligned):
        raise UsageError(f"{ASTERISK_WAV_DIR}: no prompt could be aligned (see the failures)")
    senones, senone_phone, phone_names = build_class_map(aligned)
    class_of = {s: i for i, s in enumerate(senones)}
    phone_of = {p: i for i, p in enumerate(phone_names)}

    by_utt = {r.utt: r for r in aligned}
    mine = [u for u in by_utt if u.startswith(ASTERISK_SPEAKER + "-")]
    groups = {k: [by_utt[u] for u in v] for k, v in split_utts(mine, seed).items()}
    groups["test_other"] = sorted(
        (r for r in aligned if r.utt.startswith(LIBRIVOX_SPEAKER + "-")), key=lambda r: r.utt
    )
    train_senones = {s for r in groups["train"] for s in r.senones.tolist()}
    speakers = {"test_other": LIBRIVOX_SPEAKER}
    for name, group in groups.items():
        speaker = speakers.get(name, ASTERISK_SPEAKER)
        write_split(
            out / name,
            {r.utt: r.feats for r in group},
            {r.utt: np.asarray([class_of[s] for s in r.senones.tolist()]) for r in group},
            {r.utt: np.asarray([phone_of[p] for p in r.phones]) for r in group},
            texts,
            speaker,
        )

    write_lines(out / "classes.txt", (f"{i} {s} {senone_phone[s]}" for i, s in enumerate(senones)))
    write_lines(out / "phones.txt", (f"{i} {p}" for i, p in enumerate(phone_names)))
    write_lines(out / "failed.txt", (f"{u} {failed[u]}" for u in sorted(failed)))
    counts = {
        "out_dir": str(out),
        "prompts": num_prompts,
        "aligned": len(mine),
        "classes": len(senones),
        "phones": len(phone_names),
        "classes_unseen_in_train": len(set(senones) - train_senones),
        "splits": {k: _split_counts(v, train_senones) for k, v in groups.items()},
        "failed": dict(sorted(Counter(_failure_kind(r) for r in failed.values()).items())),
    }
    atomic_write_bytes(_readme(counts, seed).encode("utf-8"), out / "README.md")
    _print_counts(counts)
    return counts
