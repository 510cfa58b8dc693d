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

    ll = log_likelihoods(log_post, log_prior(counts), trained=counts > 0, graph=graph)
    words = best_path(graph.fst, acwt * ll, beam=13.0)
"""

from __future__ import annotations

import multiprocessing as mp
from collections.abc import Iterator, Mapping

import kaldi_decoder
import kaldifst
import numpy as np

from modelavg.decoding.graph import Graph

ORACLE_OFF = -1000.0  # log score of every senone but the aligned one in an oracle decode

_SHARED: dict = {}  # set before forking: the graph and the matrices, read by worker processes


def log_prior(counts: np.ndarray) -> np.ndarray:
    """log of class frequencies with one added count per class."""
    c = np.asarray(counts, dtype=np.float64) + 1.0
    return np.log(c / c.sum())


def backoff_sources(graph: Graph, trained: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Which column of [outputs, phone states, phones, floor] scores each senone, and the
    one-hot membership matrices of trained outputs in phone states and phones. The network's
    outputs are the first ``len(trained)`` classes of the graph's ``classes.txt``."""
    states = graph.senone_states
    classes = graph.classes[: len(trained)]
    num_phones = int(states[:, 0].max()) + 1
    cls_states = states[classes]
    ok = trained & (cls_states[:, 0] >= 0)
    in_state = np.zeros((len(classes), num_phones * 3))
    in_state[np.flatnonzero(ok), (cls_states[:, 0] * 3 + cls_states[:, 1])[ok]] = 1.0
    in_phone = np.zeros((len(classes), num_phones))
    in_phone[np.flatnonzero(ok), cls_states[ok, 0]] = 1.0
    n_cls, n_st = len(classes), num_phones * 3
    source = np.full(len(states), n_cls + n_st + num_phones, dtype=np.int64)  # the floor
    for s, (phone, state) in enumerate(states):
        if phone < 0:
            continue
        if in_phone[:, phone].any():
            source[s] = n_cls + n_st + phone
        if in_state[:, phone * 3 + state].any():
            source[s] = n_cls + phone * 3 + state
    direct = np.flatnonzero(trained)
    source[classes[direct]] = direct
    return source, in_state, in_phone


def log_likelihoods(
    log_post: np.ndarray, prior: np.ndarray, trained: np.ndarray, graph: Graph
) -> np.ndarray:
    """(T, num_senones) float32 scaled log-likelihoods, with the back-off described above."""
    source, in_state, in_phone = backoff_sources(graph, trained)
    post = np.exp(log_post - log_post.max(axis=1, keepdims=True))
    shift = log_post.max(axis=1, keepdims=True)
    prior_lin = np.exp(prior)
    with np.errstate(divide="ignore", invalid="ignore"):  # empty groups: never a source
        pooled = [np.log(post @ m) + shift - np.log(prior_lin @ m) for m in (in_state, in_phone)]
    direct = log_post - prior
    floor = np.where(trained, direct, np.inf).min(axis=1, keepdims=True)
    table = np.concatenate([direct, *pooled, floor], axis=1)
    return table[:, source].astype(np.float32)


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
    return utt, best_path(
        _SHARED["fst"], _SHARED["scores"][utt], _SHARED["beam"], _SHARED["max_active"]
    )


def search_all(
    fst: kaldifst.StdFst,
    scores: Mapping[str, np.ndarray],
    beam: float,
    max_active: int,
    jobs: int,
) -> Iterator[tuple[str, list[int]]]:
    """(utt, word ids) for every utterance, over ``jobs`` forked processes, longest first."""
    _SHARED.update(fst=fst, scores=scores, beam=beam, max_active=max_active)
    order = sorted(scores, key=lambda u: -len(scores[u]))
    try:
        if jobs <= 1 or "fork" not in mp.get_all_start_methods():
            yield from map(_search_one, order)
            return
        with mp.get_context("fork").Pool(jobs) as pool:
            yield from pool.imap_unordered(_search_one, order)
    finally:
        _SHARED.clear()
