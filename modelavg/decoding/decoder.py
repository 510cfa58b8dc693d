"""Hybrid DNN-HMM decoding: network posteriors -> scaled likelihoods -> beam search in HCLG.

A network trained on senone targets estimates p(s | x); dividing by the prior p(s) gives the
scaled likelihood p(x | s) / p(x) that replaces the GMM in the HMM (Bourlard & Morgan,
"Connectionist Speech Recognition", 1994; Hinton et al. 2012, section 2). Priors are the class
frequencies of the training targets with one added count, so no prior is zero.

The graph's input labels are the acoustic model's senones, and it needs scores for senones the
network has no output for (outside ``classes.txt``, or never seen in training): cross-word
triphones of words that never met in the corpus. Each such senone backs off to the pooled state
it belongs to (same base phone, same HMM state): log of the summed posteriors of the trained
senones of that state minus the log of their summed priors, which is the scaled likelihood of
the pooled state. A phone state with no trained senone pools the whole phone; a phone with none
gets the frame's lowest class score.

The search is Kaldi's ``FasterDecoder`` (kaldi-decoder); ``DecodableCtc`` reads column
``label - 1`` of the matrix, so column s is senone s. ``--jobs`` splits utterances over forked
processes that share the loaded graph.

Example::

    ll = Scorer(graph, counts)(log_post)
    words = best_path(graph.fst, acwt * ll, beam=13.0, max_active=7000)
"""

from __future__ import annotations

import multiprocessing as mp
from collections.abc import Callable, Iterator, Mapping

import kaldi_decoder
import kaldifst
import numpy as np

from modelavg.decoding.graph import Graph

ORACLE_OFF = -1000.0  # log score of every senone but the aligned one in an oracle decode

_SHARED: dict = {}  # set before forking: the graph and the inputs, read by worker processes


def log_prior(counts: np.ndarray) -> np.ndarray:
    """log of class frequencies with one added count per class."""
    c = np.asarray(counts, dtype=np.float64) + 1.0
    return np.log(c / c.sum())


class Scorer:
    """Network log posteriors -> the graph's (T, num_senones) scaled log-likelihoods, with the
    back-off described above. The network's outputs are the first ``len(counts)`` classes of
    the graph's ``classes.txt``; ``counts`` are their training-target counts."""

    def __init__(self, graph: Graph, counts: np.ndarray) -> None:
        self.prior = log_prior(counts)
        self.trained = np.asarray(counts) > 0
        states = graph.senone_states
        classes = graph.classes[: len(counts)]
        num_phones = int(states[:, 0].max()) + 1
        cls_states = states[classes]
        ok = np.flatnonzero(self.trained & (cls_states[:, 0] >= 0))
        self.in_state = np.zeros((len(classes), num_phones * 3))
        self.in_state[ok, cls_states[ok, 0] * 3 + cls_states[ok, 1]] = 1.0
        self.in_phone = np.zeros((len(classes), num_phones))
        self.in_phone[ok, cls_states[ok, 0]] = 1.0
        # Columns of [outputs, phone states, phones, floor]: which one scores each senone.
        n_cls, n_st = len(classes), num_phones * 3
        phone, state = states[:, 0], states[:, 1]
        source = np.full(len(states), n_cls + n_st + num_phones, dtype=np.int64)  # the floor
        used = phone >= 0
        has_phone, has_state = self.in_phone.any(axis=0), self.in_state.any(axis=0)
        pooled_phone = used & has_phone[np.maximum(phone, 0)]
        source[pooled_phone] = n_cls + n_st + phone[pooled_phone]
        pooled_state = used & has_state[np.maximum(phone, 0) * 3 + state]
        source[pooled_state] = n_cls + (phone * 3 + state)[pooled_state]
        direct = np.flatnonzero(self.trained)
        source[classes[direct]] = direct
        self.source = source

    def __call__(self, log_post: np.ndarray) -> np.ndarray:
        shift = log_post.max(axis=1, keepdims=True)
        post = np.exp(log_post - shift)
        prior_lin = np.exp(self.prior)
        with np.errstate(divide="ignore", invalid="ignore"):  # empty groups: never a source
            pooled = [
                np.log(post @ m) + shift - np.log(prior_lin @ m)
                for m in (self.in_state, self.in_phone)
            ]
        direct = log_post - self.prior
        floor = np.where(self.trained, direct, np.inf).min(axis=1, keepdims=True)
        table = np.concatenate([direct, *pooled, floor], axis=1)
        return table[:, self.source].astype(np.float32)


def oracle_log_likelihoods(targets: np.ndarray, graph: Graph) -> np.ndarray:
    """One-hot scores from the aligned classes: the graph's own floor on the WER."""
    out = np.full((len(targets), len(graph.senone_states)), ORACLE_OFF, dtype=np.float32)
    out[np.arange(len(targets)), graph.classes[targets]] = 0.0
    return out


def best_path(fst: kaldifst.StdFst, scores: np.ndarray, beam: float, max_active: int) -> list[int]:
    """Word ids of the best path (empty when the search found none)."""
    opts = kaldi_decoder.FasterDecoderOptions(beam=beam, max_active=max_active)
    decoder = kaldi_decoder.FasterDecoder(fst, opts)
    decoder.decode(kaldi_decoder.DecodableCtc(np.ascontiguousarray(scores, dtype=np.float32)))
    ok, lattice = decoder.get_best_path()
    if not ok:
        return []
    ok, _, words, _ = kaldifst.get_linear_symbol_sequence(lattice)
    return [w for w in words if w] if ok else []


def _search_one(utt: str) -> tuple[str, list[int]]:
    shared = _SHARED
    scores = shared["score"](shared["inputs"][utt])
    return utt, best_path(shared["fst"], scores, shared["beam"], shared["max_active"])


def search_all(
    fst: kaldifst.StdFst,
    inputs: Mapping[str, np.ndarray],
    score: Callable[[np.ndarray], np.ndarray],
    beam: float,
    max_active: int,
    jobs: int,
) -> Iterator[tuple[str, list[int]]]:
    """(utt, word ids) for every utterance, over ``jobs`` forked processes, longest first.
    ``score`` turns an utterance's input (posteriors, or targets for the oracle) into the
    graph's scores inside the worker, so only one utterance's senone matrix exists at a time."""
    _SHARED.update(fst=fst, inputs=inputs, score=score, beam=beam, max_active=max_active)
    order = sorted(inputs, key=lambda u: -len(inputs[u]))
    try:
        if jobs <= 1 or "fork" not in mp.get_all_start_methods():
            yield from map(_search_one, order)
            return
        with mp.get_context("fork").Pool(jobs) as pool:
            yield from pool.imap_unordered(_search_one, order)
    finally:
        _SHARED.clear()
