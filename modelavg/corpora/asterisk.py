"""Real speech demo corpus: Asterisk telephone prompts force-aligned to senones with pocketsphinx.

The paper trains on GMM-HMM state (senone) alignments of real speech. Offline, the closest real
material is the Asterisk English prompt set (one female speaker, 8 kHz, CC-BY-SA-3.0): we normalise
its transcripts, force-align them with pocketsphinx's bundled en-us model to get one senone and one
phone per 10 ms frame, compute 40-dim log-mel filterbanks with kaldi-native-fbank and write Kaldi
data directories. Five LibriVox utterances from pocketsphinx-testdata (another speaker) form a
cross-speaker ``test_other`` set.

Choices (also written to the corpus README):

* Audio is upsampled to 16 kHz (the acoustic model's rate); the filterbank spans 20-3800 Hz, the
  telephone band, so that no bins are spent on the empty band above 4 kHz and the wideband
  LibriVox audio is described by the same band.
* Frame counts: the aligner's labels are kept as they are. Features with fewer frames (by at most
  ``MAX_FRAME_MISMATCH``) are padded by repeating their last frame; extra feature frames are
  dropped. A larger mismatch fails the utterance.
* Classes are all senones seen in any aligned utterance (all splits and ``test_other``), numbered
  in increasing senone id. Senones unseen in training therefore keep their own class (never
  predicted well by a model trained on ``train``, which is the honest outcome) instead of being
  merged into a neighbour; the counts of such frames are reported.
* The pocketsphinx front end keeps state between utterances; it is reset before every utterance so
  that alignments do not depend on processing order or on the number of worker processes.
"""

from __future__ import annotations

import gzip
import math
import re
import sys
from collections import Counter
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from modelavg.data.kaldi import write_data_dir
from modelavg.errors import UsageError

ASTERISK_WAV_DIR = Path("/usr/share/asterisk/sounds/en_US_f_Allison")
ASTERISK_TRANSCRIPT = Path("/usr/share/doc/asterisk-core-sounds-en/core-sounds-en.txt.gz")
LIBRIVOX_DIR = Path("/usr/share/pocketsphinx/test/data/librivox")
APT_INSTALL = (
    "apt-get install -y asterisk-core-sounds-en-wav asterisk-core-sounds-en pocketsphinx-testdata"
)
PIP_INSTALL = "pip install pocketsphinx kaldi-native-fbank soundfile scipy"

SAMPLE_RATE = 16000
NUM_MEL_BINS = 40
MEL_LOW_FREQ = 20.0
MEL_HIGH_FREQ = 3800.0
MAX_FRAME_MISMATCH = 2
SPLITS = ("train", "cv", "test")
# Wider than pocketsphinx's defaults (1e-48, 1e-40, 1e-48): forced alignment has a single path, so
# a wide beam costs little, and the defaults lose the path on a few long or quiet prompts.
DECODER_BEAMS = {"beam": 1e-80, "wbeam": 1e-60, "pbeam": 1e-80}
HELD_OUT_FRACTION = 0.1  # each of cv and test
ASTERISK_SPEAKER = "allison"
LIBRIVOX_SPEAKER = "librivox"

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
# Words missing from the bundled CMU dictionary (ARPAbet, as the en-us model expects).
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

_ONES = [
    "zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten",
    "eleven", "twelve", "thirteen", "fourteen", "fifteen", "sixteen", "seventeen", "eighteen",
    "nineteen",
]  # fmt: skip
_TENS = ["", "", "twenty", "thirty", "forty", "fifty", "sixty", "seventy", "eighty", "ninety"]


@dataclass
class _Job:
    utt: str
    wav: str
    text: str


@dataclass
class _Result:
    utt: str
    failure: str | None = None
    feats: np.ndarray | None = None
    senones: np.ndarray | None = None
    phones: list[str] | None = None


# ----------------------------------------------------------------------------------------------
# Text normalisation


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


def read_librivox_transcripts(path: Path) -> dict[str, str]:
    """Read Sphinx-style ``<s> words </s> (utt)`` lines."""
    prompts: dict[str, str] = {}
    for line in path.read_text(encoding="utf-8").splitlines():
        m = re.match(r"\s*(.*?)\s*\((\S+)\)\s*$", line)
        if m:
            words = [w for w in m.group(1).split() if w not in ("<s>", "</s>")]
            prompts[m.group(2)] = " ".join(words).lower()
    return prompts


# ----------------------------------------------------------------------------------------------
# Inputs and dependencies


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


def _asterisk_jobs(max_utts: int | None) -> tuple[list[_Job], dict[str, str], int]:
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
            jobs.append(_Job(utt, str(wav), text))
    return jobs, failed, len(names)


def _librivox_jobs() -> list[_Job]:
    prompts = read_librivox_transcripts(Path(LIBRIVOX_DIR) / "transcription")
    return [
        _Job(utt_id(LIBRIVOX_SPEAKER, name), str(Path(LIBRIVOX_DIR) / f"{name}.wav"), text)
        for name, text in sorted(prompts.items())
    ]


# ----------------------------------------------------------------------------------------------
# Per-utterance work (runs in worker processes)

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


def load_audio_16k(path: str) -> np.ndarray:
    """Read a wav file as int16 samples at 16 kHz (polyphase resampling when needed)."""
    import soundfile
    from scipy.signal import resample_poly

    samples, rate = soundfile.read(path, dtype="int16", always_2d=True)
    samples = samples[:, 0]
    if rate != SAMPLE_RATE:
        g = math.gcd(rate, SAMPLE_RATE)
        up = resample_poly(samples.astype(np.float64), SAMPLE_RATE // g, rate // g)
        samples = np.clip(np.round(up), -32768, 32767).astype(np.int16)
    return samples


def fbank(samples: np.ndarray) -> np.ndarray:
    """40-dim Kaldi log-mel filterbank, 25 ms / 10 ms, no dither (deterministic)."""
    import kaldi_native_fbank as knf

    opts = knf.FbankOptions()
    opts.frame_opts.samp_freq = SAMPLE_RATE
    opts.frame_opts.dither = 0.0
    opts.mel_opts.num_bins = NUM_MEL_BINS
    opts.mel_opts.low_freq = MEL_LOW_FREQ
    opts.mel_opts.high_freq = MEL_HIGH_FREQ
    computer = knf.OnlineFbank(opts)
    computer.accept_waveform(SAMPLE_RATE, samples.astype(np.float32).tolist())
    computer.input_finished()
    frames = [computer.get_frame(i) for i in range(computer.num_frames_ready)]
    return np.asarray(frames, dtype=np.float32).reshape(-1, NUM_MEL_BINS)


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


def _process(job: _Job) -> _Result:
    decoder = _DECODER if _DECODER is not None else _new_decoder()
    oov = [w for w in job.text.split() if decoder.lookup_word(w) is None]
    if oov:
        return _Result(job.utt, failure=f"out-of-vocabulary words ({' '.join(sorted(set(oov)))})")
    samples = load_audio_16k(job.wav)
    aligned = align(decoder, samples, job.text)
    if isinstance(aligned, str):
        return _Result(job.utt, failure=aligned)
    senones, phones = aligned
    feats = match_frames(fbank(samples), len(senones))
    if feats is None:
        return _Result(job.utt, failure="frame count mismatch between features and alignment")
    return _Result(job.utt, feats=feats, senones=senones, phones=phones)


def _run_jobs(jobs: list[_Job], num_workers: int, progress: bool) -> Iterator[_Result]:
    """Align in a worker pool, longest files first (results are keyed, so order is free)."""
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


# ----------------------------------------------------------------------------------------------
# Class maps, split and writing


def build_class_map(results: Iterable[_Result]) -> tuple[list[int], dict[int, str], list[str]]:
    """Sorted senone ids, senone -> phone, sorted phone names, over every aligned utterance."""
    senone_phone: dict[int, str] = {}
    for r in results:
        for s, p in zip(r.senones.tolist(), r.phones, strict=True):
            if senone_phone.setdefault(s, p) != p:
                raise RuntimeError(f"senone {s} aligned to phones {senone_phone[s]} and {p}")
    return sorted(senone_phone), senone_phone, sorted(set(senone_phone.values()))


def split_utts(utts: list[str], seed: int) -> dict[str, list[str]]:
    """Seeded 80/10/10 split by utterance (cv and test get at least one each when possible)."""
    utts = sorted(utts)
    n = len(utts)
    n_held = max(1, round(HELD_OUT_FRACTION * n)) if n >= 3 else 0
    perm = np.random.default_rng(seed).permutation(n)
    test, cv, train = perm[:n_held], perm[n_held : 2 * n_held], perm[2 * n_held :]
    return {
        name: sorted(utts[i] for i in idx)
        for name, idx in zip(SPLITS, (train, cv, test), strict=True)
    }


def write_lines(path: Path, lines: Iterable[str]) -> None:
    path.write_text("".join(line + "\n" for line in lines), encoding="utf-8")


def write_split(
    split_dir: Path,
    feats: dict[str, np.ndarray],
    targets: dict[str, np.ndarray],
    phones: dict[str, np.ndarray],
    texts: dict[str, str],
    speaker: str,
) -> None:
    """One Kaldi data directory: the tables plus ``text``, ``utt2spk`` and ``spk2utt``."""
    write_data_dir(split_dir, feats, targets, tables={"phones": phones})
    utts = sorted(feats)
    write_lines(split_dir / "text", (f"{u} {texts[u]}" for u in utts))
    write_lines(split_dir / "utt2spk", (f"{u} {speaker}" for u in utts))
    write_lines(split_dir / "spk2utt", [" ".join([speaker, *utts])])


def _split_counts(results: list[_Result], train_senones: set[int]) -> dict[str, int]:
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
   spelled out, punctuation removed, a small substitution map for typos and acronyms and a few
   added pronunciations for out-of-vocabulary words (`modelavg/corpora/asterisk.py`).
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
    results = {r.utt: r for r in _run_jobs(jobs + other_jobs, num_workers, progress)}
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
    (out / "README.md").write_text(_readme(counts, seed), encoding="utf-8")
    _print_counts(counts)
    return counts
