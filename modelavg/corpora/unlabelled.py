"""Unlabelled speech for RBM pretraining: the Asterisk prompts in other languages, features only.

Debian packages ``asterisk-core-sounds-{es,fr,it,ru}-wav`` hold the prompts of four other
speakers. Their log-mel features (``corpora.audio``, the demo corpus's front end) make a
``feats.scp``-only data directory that ``modelavg pretrain`` can use; no transcripts or
alignments are needed.

Example::

    prepare_unlabelled("data/unlabelled", langs=("es", "fr"))
"""

from __future__ import annotations

from pathlib import Path

from tqdm import tqdm

from modelavg.corpora.audio import fbank, load_audio_16k
from modelavg.data.kaldi import write_data_dir
from modelavg.errors import UsageError

SOUNDS = Path("/usr/share/asterisk/sounds")
VOICES = {
    "es": "es_MX_f_Allison",
    "fr": "fr_CA_f_June",
    "it": "it_IT_m_Carlo",
    "ru": "ru_RU_f_IvrvoiceRU",
}


def prepare_unlabelled(
    out_dir: str | Path = "data/unlabelled",
    langs: tuple[str, ...] = ("es", "fr", "it", "ru"),
    max_utts: int | None = None,
    progress: bool = True,
) -> dict[str, int]:
    """Write ``out_dir/feats.{ark,scp}`` from every prompt of the given languages."""
    wavs = []
    for lang in langs:
        if lang not in VOICES:
            raise UsageError(f"--langs {lang}: choose from {', '.join(VOICES)}")
        voice = SOUNDS / VOICES[lang]
        if not voice.is_dir():
            raise UsageError(
                f"{voice}: not found; run: apt-get install -y asterisk-core-sounds-{lang}-wav"
            )
        wavs += [(lang, w) for w in sorted(voice.rglob("*.wav"))]
    wavs = wavs[:max_utts] if max_utts else wavs
    feats = {}
    for lang, wav in tqdm(wavs, desc="features", disable=not progress, unit="utt"):
        mat = fbank(load_audio_16k(str(wav)))
        if len(mat) >= 11:  # at least one full +-5 splice window
            name = str(wav.relative_to(SOUNDS / VOICES[lang]).with_suffix("")).replace("/", "-")
            feats[f"{lang}-{name}"] = mat
    write_data_dir(out_dir, feats)
    counts = {"utterances": len(feats), "frames": sum(len(m) for m in feats.values())}
    print(
        f"unlabelled speech ({', '.join(langs)}) in {out_dir}: {counts['utterances']} "
        f"utterances, {counts['frames']} frames"
    )
    return counts
