"""Synthetic speech corpus for scale studies: festival sentences with exact phone-state targets.

The real demo corpus is too small for N = 16-32 workers to average many times per epoch (its
size: docs/RESULTS.md). Festival (Debian ``festival festvox-kallpc16k festlex-cmu``) synthesises
any amount of speech offline and knows where every phone starts and ends, so a corpus of millions
of labelled frames is cheap. It is synthetic (one diphone voice), never a substitute for real
speech: use it to study how training scales, and the demo corpus for how well a model recognises.

Choices (also written to the corpus README):

* Text: random sentences of 4-12 words drawn uniformly from the vocabulary of the Asterisk
  prompts (real English words the lexicon knows), one seeded generator per utterance.
* Variability, drawn per utterance: speaking rate (festival ``Duration_Stretch``), pitch mean and
  range (``int_lr_params``), white noise at a random SNR, then a channel: spectral tilt
  (first-order filter) and gain. Without it every instance of a phone would sound the same.
* Targets: each phone segment's frames are split into ``STATES_PER_PHONE`` equal parts, the
  left-to-right HMM states of a GMM-HMM system; a frame belongs to the segment holding its
  centre. Classes are every (phone, state) pair seen, in sorted order.
* Features: the demo corpus's log-mel filterbank (``corpora.audio``), so models and recipes
  carry over. Every utterance's random draws depend only on (seed, utterance index): the
  corpus is byte-identical whatever ``jobs``.

Example::

    counts = prepare_synthetic("data/synthetic", num_utts=12000, jobs=2)
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import tempfile
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from modelavg.corpora.asterisk import ASTERISK_TRANSCRIPT
from modelavg.corpora.audio import NUM_MEL_BINS, fbank, load_audio_16k
from modelavg.corpora.datadir import split_utts, write_lines, write_split
from modelavg.corpora.text import normalize_text, read_asterisk_transcripts
from modelavg.errors import UsageError
from modelavg.io import atomic_write_bytes

APT_INSTALL = "apt-get install -y festival festvox-kallpc16k festlex-cmu asterisk-core-sounds-en"
STATES_PER_PHONE = 3
WORDS_PER_SENTENCE = (4, 12)
DURATION_STRETCH = (0.8, 1.3)
F0_MEAN_HZ = (80.0, 180.0)
F0_STD_HZ = (8.0, 30.0)
GAIN_DB = (-20.0, 0.0)
TILT = (-0.5, 0.8)  # y[n] = x[n] - a x[n-1]: a > 0 brightens, a < 0 darkens
SNR_DB = (15.0, 35.0)
UTTS_PER_CALL = 40  # sentences per festival process: its start-up amortised, the bar still moves
SPEAKER = "festival-kal"
FRAME_SHIFT_S = 0.010
FRAME_LENGTH_S = 0.025
UTT_EDGE = "#"  # the phone context before the first and after the last segment


def tie_states(
    train_labels: list[tuple[str, str, str, int]],
    phone_states: list[tuple[str, int]],
    num_classes: int,
) -> list[tuple]:
    """Context-dependent targets like a GMM-HMM system's tied states, by frequency instead of a
    decision tree: every (phone, state) is a class (the back-off), and the most frequent
    (left, phone, right, state) triphone states of ``train_labels`` (ties by name) fill the
    inventory up to ``num_classes``. A frame whose triphone state was not kept takes its
    (phone, state): ``tied``."""
    if num_classes < len(phone_states):
        raise UsageError(
            f"--context-classes {num_classes}: fewer than the {len(phone_states)} phone states"
        )
    counts = Counter(train_labels)
    ranked = sorted(counts, key=lambda label: (-counts[label], label))
    return sorted(phone_states) + sorted(ranked[: num_classes - len(phone_states)])


def tied(label: tuple[str, str, str, int], kept: set) -> tuple:
    """The class of a triphone state: itself if kept by ``tie_states``, else (phone, state)."""
    return label if label in kept else (label[1], label[3])


def class_name(c: tuple) -> str:
    """``ph_1`` for a phone state, ``l-ph+r_1`` for a triphone state."""
    return f"{c[0]}_{c[1]}" if len(c) == 2 else f"{c[0]}-{c[1]}+{c[2]}_{c[3]}"


@dataclass(frozen=True)
class Utterance:
    """One sentence to synthesise and the per-utterance variability drawn for it."""

    utt: str
    text: str
    duration_stretch: float
    f0_mean: float
    f0_std: float
    gain_db: float
    tilt: float
    snr_db: float
    noise_seed: int


@dataclass
class Synthesised:
    utt: str
    feats: np.ndarray  # frames x NUM_MEL_BINS
    phones: list[str]  # per frame
    states: np.ndarray  # per frame, 0 .. STATES_PER_PHONE - 1
    contexts: list[tuple[str, str]]  # per frame: the phones of the segments before and after

    def labels(self) -> list[tuple[str, int]]:
        """(phone, state) per frame."""
        return list(zip(self.phones, self.states.tolist(), strict=True))

    def context_labels(self) -> list[tuple[str, str, str, int]]:
        """(left phone, phone, right phone, state) per frame: a triphone state."""
        return [
            (left, p, right, s)
            for (left, right), p, s in zip(
                self.contexts, self.phones, self.states.tolist(), strict=True
            )
        ]


def vocabulary(transcript: Path = ASTERISK_TRANSCRIPT) -> list[str]:
    """Sorted distinct words of the Asterisk prompts, as the demo corpus normalises them."""
    if not transcript.exists():
        raise UsageError(f"{transcript}: not found; run: {APT_INSTALL}")
    prompts = read_asterisk_transcripts(transcript).values()
    words = {w for text in prompts for w in normalize_text(text).split()}
    return sorted(w for w in words if w.replace("'", "").isalpha())


def draw_utterance(index: int, vocab: list[str], seed: int) -> Utterance:
    """The sentence and variability of utterance ``index``: a function of (seed, index) only."""
    rng = np.random.default_rng([seed, index])
    num_words = int(rng.integers(WORDS_PER_SENTENCE[0], WORDS_PER_SENTENCE[1] + 1))
    text = " ".join(vocab[i] for i in rng.integers(0, len(vocab), num_words))
    u = {name: float(rng.uniform(*r)) for name, r in (
        ("duration_stretch", DURATION_STRETCH), ("f0_mean", F0_MEAN_HZ), ("f0_std", F0_STD_HZ),
        ("gain_db", GAIN_DB), ("tilt", TILT), ("snr_db", SNR_DB))}  # fmt: skip
    return Utterance(f"{SPEAKER}-{index:06d}", text, noise_seed=int(rng.integers(2**31)), **u)


def festival_script(utts: list[Utterance], out_dir: Path) -> str:
    """A festival batch script: per utterance set rate and pitch, synthesise, save wav + labels."""
    lines = []
    for u in utts:
        lines += [
            f"(Parameter.set 'Duration_Stretch {u.duration_stretch:.4f})",
            f"(set! int_lr_params '((target_f0_mean {u.f0_mean:.2f}) (target_f0_std "
            f"{u.f0_std:.2f}) (model_f0_mean 170) (model_f0_std 34)))",
            f'(set! utt (SynthText "{u.text}"))',
            f'(utt.save.wave utt "{out_dir / u.utt}.wav" \'riff)',
            f'(utt.save.segs utt "{out_dir / u.utt}.lab")',
        ]
    return "\n".join(lines) + "\n"


def read_segments(path: Path) -> list[tuple[float, str]]:
    """Festival ``utt.save.segs`` labels: (end time in s, phone) per segment, in order."""
    lines = path.read_text(encoding="utf-8").splitlines()
    body = lines[lines.index("#") + 1 :] if "#" in lines else lines
    segments = []
    for line in body:
        fields = line.split()
        if len(fields) == 3:
            segments.append((float(fields[0]), fields[2]))
    if not segments:
        raise UsageError(f"{path}: no phone segments")
    return segments


def frame_segments(segments: list[tuple[float, str]], num_frames: int) -> np.ndarray:
    """Index of the segment holding each frame's centre; frames past the last segment's end
    (the analysis window's tail) belong to the last segment."""
    centres = np.arange(num_frames) * FRAME_SHIFT_S + FRAME_LENGTH_S / 2
    ends = np.array([end for end, _ in segments])
    return np.minimum(np.searchsorted(ends, centres, side="right"), len(segments) - 1)


def frame_contexts(segments: list[tuple[float, str]], num_frames: int) -> list[tuple[str, str]]:
    """(phone before, phone after) each frame's segment; ``UTT_EDGE`` at the utterance's ends."""
    names = [UTT_EDGE] + [p for _, p in segments] + [UTT_EDGE]
    return [(names[i], names[i + 2]) for i in frame_segments(segments, num_frames).tolist()]


def frame_labels(
    segments: list[tuple[float, str]], num_frames: int
) -> tuple[list[str], np.ndarray]:
    """Phone and state per frame: the segment holding the frame's centre, cut into equal states."""
    seg = frame_segments(segments, num_frames)
    states = np.zeros(num_frames, dtype=np.int64)
    starts = np.flatnonzero(np.r_[True, seg[1:] != seg[:-1]])
    for s, e in zip(starts, np.r_[starts[1:], num_frames], strict=True):
        states[s:e] = (np.arange(e - s) * STATES_PER_PHONE) // (e - s)
    return [segments[i][1] for i in seg], states


def channel(samples: np.ndarray, u: Utterance) -> np.ndarray:
    """White noise at the utterance's SNR (against the clean speech), then the channel's
    spectral tilt and gain, which colour speech and noise alike; back to int16."""
    x = samples.astype(np.float64)
    noise = np.random.default_rng(u.noise_seed).standard_normal(len(x))
    x = x + noise * np.sqrt(np.mean(x**2) / 10 ** (u.snr_db / 10)) if len(x) else x
    x = np.r_[x[:1], x[1:] - u.tilt * x[:-1]] * 10 ** (u.gain_db / 20)
    return np.clip(np.round(x), -32768, 32767).astype(np.int16)


def synthesise(utts: list[Utterance]) -> list[Synthesised]:
    """One festival process for a batch of sentences, then channel, features and labels."""
    with tempfile.TemporaryDirectory(prefix="modelavg-festival-") as tmp:
        tmp_dir = Path(tmp)
        script = tmp_dir / "batch.scm"
        script.write_text(festival_script(utts, tmp_dir), encoding="utf-8")
        proc = subprocess.run(["festival", "-b", str(script)], capture_output=True, text=True)
        results = []
        for u in utts:
            wav, lab = tmp_dir / f"{u.utt}.wav", tmp_dir / f"{u.utt}.lab"
            if not wav.exists() or not lab.exists():
                err = (proc.stderr.strip().splitlines() or ["no output"])[-1]
                raise UsageError(f"festival failed on utterance {u.utt} ({u.text!r}): {err}")
            feats = fbank(channel(load_audio_16k(str(wav)), u))
            segments = read_segments(lab)
            phones, states = frame_labels(segments, len(feats))
            contexts = frame_contexts(segments, len(feats))
            results.append(Synthesised(u.utt, feats, phones, states, contexts))
    return results


def _run(batches: list[list[Utterance]], jobs: int, progress: bool) -> Iterator[Synthesised]:
    import multiprocessing as mp

    from tqdm import tqdm

    total = sum(len(b) for b in batches)
    bar = tqdm(total=total, desc="synthesising", unit="utt", disable=not progress, file=sys.stderr)
    pool = mp.get_context("spawn").Pool(jobs) if jobs > 1 else None
    try:
        for batch in pool.imap(synthesise, batches) if pool else map(synthesise, batches):
            yield from batch
            bar.update(len(batch))
    finally:
        bar.close()
        if pool:
            pool.terminate()


def _check_dependencies() -> None:
    if shutil.which("festival") is None:
        raise UsageError(f"festival: command not found; run: {APT_INSTALL}")
    voice = Path("/usr/share/festival/voices/english/kal_diphone")
    if not voice.exists():
        raise UsageError(f"{voice}: not found; run: {APT_INSTALL}")


def _readme(counts: dict, seed: int) -> str:
    rows = "\n".join(
        f"| {name} | {c['utterances']} | {c['frames']} | {c['frames'] * FRAME_SHIFT_S / 3600:.2f} |"
        for name, c in counts["splits"].items()
    )
    return f"""# Synthetic speech corpus (frame-level phone-state targets)

Generated by `modelavg prepare-synthetic` (`modelavg/corpora/synthetic.py`), seed {seed},
{counts["utterances"]} sentences. Synthetic speech from one diphone voice: for scale studies,
not a measure of recognition accuracy on real speech.
{counts["classes"]} classes: {_targets(counts)}.

| split | utterances | frames | hours |
|---|---|---|---|
{rows}

## How it was made

1. Text: {WORDS_PER_SENTENCE[0]}-{WORDS_PER_SENTENCE[1]} words drawn uniformly from the
   {counts["vocabulary"]}-word vocabulary of the Asterisk English prompts.
2. Festival (`kal_diphone` voice, CMU lexicon) synthesises each sentence at 16 kHz with a random
   speaking rate (Duration_Stretch {DURATION_STRETCH[0]}-{DURATION_STRETCH[1]}) and pitch
   (mean {F0_MEAN_HZ[0]:g}-{F0_MEAN_HZ[1]:g} Hz, range {F0_STD_HZ[0]:g}-{F0_STD_HZ[1]:g} Hz) and
   writes the phone segments it used.
3. White noise at {SNR_DB[0]:g}-{SNR_DB[1]:g} dB SNR (against the clean sentence), then a
   channel: tilt y[n] = x[n] - a x[n-1] with a in [{TILT[0]}, {TILT[1]}] and gain
   {GAIN_DB[0]:g} to {GAIN_DB[1]:g} dB.
4. Features: {NUM_MEL_BINS}-dim log-mel filterbank as in the demo corpus (kaldi-native-fbank,
   25 ms / 10 ms, no dither). No normalisation is applied.
5. Targets: a frame takes the phone segment holding its centre; each segment's frames are cut
   into {STATES_PER_PHONE} equal parts (states 0, 1, 2). Classes: every (phone, state) seen, and
   with `--context-classes` the most frequent (left phone, phone, right phone, state) triphone
   states of the training split up to that many classes; other frames keep their phone state.
6. Split: utterances permuted with `numpy.random.default_rng({seed})`; 10% `test`, 10% `cv`.

## Files

- `classes.txt`: `class_id phone_state phone`; `phones.txt`: `phone_id phone`.
- per split: `feats.scp/ark`, `targets.scp/ark`, `phones.scp/ark`, `text`, `utt2spk`, `spk2utt`.

Festival and the kal diphone voice: free software (Festival: X11-style licence, University of
Edinburgh; festvox-kallpc16k: see its Debian copyright file). The Asterisk transcripts:
CC-BY-SA-3.0.
"""


def _targets(counts: dict) -> str:
    states = f"{counts['phones']} phones x up to {STATES_PER_PHONE} states"
    if counts["classes"] == counts["phone_states"]:
        return states
    tied_ = counts["classes"] - counts["phone_states"]
    return f"{counts['phone_states']} phone states ({states}) and {tied_} triphone states"


def prepare_synthetic(
    out_dir: str | Path = "data/synthetic",
    num_utts: int = 12000,
    seed: int = 0,
    jobs: int = 2,
    progress: bool = True,
    context_classes: int = 0,
) -> dict:
    """Synthesise ``num_utts`` sentences into ``out_dir/{train,cv,test}``; return the counts.
    Targets: phone states, or with ``context_classes`` that many tied triphone states."""
    if num_utts < 3:
        raise UsageError(f"--utts must be >= 3 (one per split), got {num_utts}")
    if jobs < 1:
        raise UsageError(f"--jobs must be >= 1, got {jobs}")
    _check_dependencies()
    vocab = vocabulary()
    utts = [draw_utterance(i, vocab, seed) for i in range(num_utts)]
    batches = [utts[i : i + UTTS_PER_CALL] for i in range(0, num_utts, UTTS_PER_CALL)]
    results = {r.utt: r for r in _run(batches, jobs, progress)}
    texts = {u.utt: u.text for u in utts}

    splits = split_utts(list(results), seed)
    pairs = sorted({label for r in results.values() for label in r.labels()})
    if context_classes:
        train = [x for u in splits["train"] for x in results[u].context_labels()]
        classes = tie_states(train, pairs, context_classes)
        kept = {c for c in classes if len(c) == 4}
        labels = {u: [tied(x, kept) for x in r.context_labels()] for u, r in results.items()}
    else:
        classes, labels = pairs, {u: r.labels() for u, r in results.items()}
    class_of = {c: i for i, c in enumerate(classes)}
    phone_names = sorted({p for p, _ in pairs})
    phone_of = {p: i for i, p in enumerate(phone_names)}
    out = Path(out_dir)
    counts = {"utterances": num_utts, "vocabulary": len(vocab), "classes": len(classes),
              "phones": len(phone_names), "phone_states": len(pairs), "splits": {}}  # fmt: skip
    for name, names in splits.items():
        group = [results[u] for u in names]
        write_split(
            out / name,
            {r.utt: r.feats for r in group},
            {r.utt: np.array([class_of[x] for x in labels[r.utt]]) for r in group},
            {r.utt: np.array([phone_of[p] for p in r.phones]) for r in group},
            texts,
            SPEAKER,
        )
        frames = sum(len(r.feats) for r in group)
        counts["splits"][name] = {"utterances": len(group), "frames": frames}
    write_lines(
        out / "classes.txt",
        (f"{i} {class_name(c)} {c[0] if len(c) == 2 else c[1]}" for i, c in enumerate(classes)),
    )
    write_lines(out / "phones.txt", (f"{i} {p}" for i, p in enumerate(phone_names)))
    atomic_write_bytes(_readme(counts, seed).encode("utf-8"), out / "README.md")
    sizes = ", ".join(
        f"{k} {v['utterances']} utts {v['frames']} frames" for k, v in counts["splits"].items()
    )
    print(f"synthetic corpus in {out}: {len(classes)} classes, {len(phone_names)} phones; {sizes}")
    return counts
