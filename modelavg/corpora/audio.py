"""The speech front end of every bundled speech corpus: 16 kHz audio in, log-mel filterbanks out.

One front end for the demo, synthetic and unlabelled corpora lets a model or DBN trained on one be
used on another.

* Audio is read at 16 kHz (the pocketsphinx en-us model's rate), resampled polyphase when needed.
* The filterbank spans 20-3800 Hz, the telephone band: the 8 kHz Asterisk prompts hold nothing
  above 4 kHz, and wideband audio is then described by the same band.
* No dither, so the same audio always gives the same bytes.

Example::

    feats = fbank(load_audio_16k("prompt.wav"))  # (frames, NUM_MEL_BINS) float32
"""

from __future__ import annotations

import math

import numpy as np

SAMPLE_RATE = 16000
NUM_MEL_BINS = 40
MEL_LOW_FREQ = 20.0
MEL_HIGH_FREQ = 3800.0


def load_audio_16k(path: str) -> np.ndarray:
    """A wav file as int16 samples at 16 kHz (first channel; polyphase resampling if needed)."""
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
    """Kaldi log-mel filterbank of 16 kHz samples, 25 ms window / 10 ms shift, no dither."""
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
