"""Phone error rate from a network's frame-level senone posteriors.

Frame accuracy on senones depends on the alignment's arbitrary state boundaries; phone error rate
(PER) is what speech papers report and what a listener would notice. The decoder here is the
simplest hybrid DNN/HMM: senone posteriors are summed into phone posteriors, divided by phone
priors (the "scaled likelihoods" p(x|phone)/p(x)), and a frame-level HMM with one state per phone
picks the best phone path. Its transitions, estimated from the training alignments, act both as a
phone bigram (phone changes) and as a duration model (self-loops). The result is collapsed into a
phone string and compared with the reference by Levenshtein distance.

Typical use::

    class_to_phone, phone_names = load_class_map("data/demo")
    model = estimate_phone_bigram(train_phone_seqs, len(phone_names))
    result = phone_error_rate(((log_probs[u], ref_phones[u]) for u in utts), class_to_phone, model)
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from modelavg.errors import UsageError

ArrayLike = torch.Tensor | np.ndarray | Sequence[int]
Targets = ArrayLike | Iterable[ArrayLike] | Mapping[str, ArrayLike]


@dataclass
class PhoneModel:
    """Frame-level phone HMM: log transitions (P x P, rows sum to 1), log initial and log priors."""

    log_trans: torch.Tensor
    log_init: torch.Tensor
    log_prior: torch.Tensor

    @property
    def num_phones(self) -> int:
        return self.log_trans.shape[0]


@dataclass
class PerResult:
    """Phone errors (substitutions + deletions + insertions) over reference phones."""

    errors: int
    ref_len: int
    num_utts: int

    @property
    def per(self) -> float:
        return self.errors / max(self.ref_len, 1)


def _as_numpy(x: ArrayLike, dtype=None) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        x = x.detach().cpu().numpy()
    return np.asarray(x, dtype=dtype)


def load_class_map(demo_dir: str | os.PathLike) -> tuple[torch.Tensor, list[str]]:
    """Read ``classes.txt`` and ``phones.txt``: the class -> phone id map and the phone names."""
    demo_dir = Path(demo_dir)
    phones_path, classes_path = demo_dir / "phones.txt", demo_dir / "classes.txt"
    phone_names = [fields[1] for fields in _read_table(phones_path, 2)]
    phone_id = {name: i for i, name in enumerate(phone_names)}
    class_to_phone = []
    for n, fields in enumerate(_read_table(classes_path, 3)):
        if int(fields[0]) != n or fields[2] not in phone_id:
            raise UsageError(f"{classes_path}: line {n + 1} is not '{n} <senone> <phone>'")
        class_to_phone.append(phone_id[fields[2]])
    return torch.tensor(class_to_phone, dtype=torch.long), phone_names


def _read_table(path: Path, num_fields: int) -> list[list[str]]:
    """Lines of ``id field...`` with ids 0..N-1 in order (the corpus writes them so)."""
    if not path.exists():
        raise UsageError(f"{path}: no such file (run prepare-demo first)")
    rows = [line.split() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    for n, fields in enumerate(rows):
        if len(fields) != num_fields or fields[0] != str(n):
            raise UsageError(f"{path}: line {n + 1} should have {num_fields} fields, id {n}")
    if not rows:
        raise UsageError(f"{path}: empty")
    return rows


def senone_to_phone_posteriors(
    log_probs: torch.Tensor, class_to_phone: torch.Tensor, num_phones: int | None = None
) -> torch.Tensor:
    """Phone log posteriors (T x P): logsumexp of the senone log posteriors of each phone.

    Phones with no class get -inf. Computed with a per-phone max shift, so it is exact even when
    every senone of a phone has a tiny probability.
    """
    class_to_phone = class_to_phone.to(log_probs.device, torch.long)
    if num_phones is None:
        num_phones = int(class_to_phone.max()) + 1
    frames = log_probs.shape[0]
    index = class_to_phone.unsqueeze(0).expand(frames, -1)
    neg_inf = torch.full((frames, num_phones), -torch.inf, dtype=log_probs.dtype)
    peak = neg_inf.to(log_probs.device).scatter_reduce(1, index, log_probs, reduce="amax")
    finite_peak = torch.where(torch.isfinite(peak), peak, torch.zeros_like(peak))
    shifted = (log_probs - finite_peak.gather(1, index)).exp()
    sums = torch.zeros_like(peak).index_add_(1, class_to_phone, shifted)
    return sums.log() + finite_peak


def estimate_phone_bigram(
    phone_seqs: Iterable[ArrayLike], num_phones: int, smoothing: float = 1.0
) -> PhoneModel:
    """Frame-level transition, initial and prior log probabilities from per-frame phone ids.

    Counts consecutive frame pairs (self-loops included) with ``smoothing`` added to every cell,
    so unseen phone changes stay possible; priors are smoothed frame frequencies.
    """
    if smoothing < 0:
        raise UsageError(f"smoothing: must be >= 0, got {smoothing}")
    trans = np.zeros((num_phones, num_phones))
    init = np.zeros(num_phones)
    freq = np.zeros(num_phones)
    for seq in phone_seqs:
        seq = _as_numpy(seq, np.int64)
        if len(seq) == 0:
            continue
        if seq.min() < 0 or seq.max() >= num_phones:
            raise UsageError(f"phone ids must lie in 0..{num_phones - 1}, got {seq.max()}")
        np.add.at(trans, (seq[:-1], seq[1:]), 1.0)
        init[seq[0]] += 1.0
        freq += np.bincount(seq, minlength=num_phones)
    trans += smoothing
    init += smoothing
    freq += smoothing
    with np.errstate(divide="ignore"):  # all-zero rows (no data, no smoothing) become -inf
        log_trans = np.log(trans / np.maximum(trans.sum(1, keepdims=True), 1e-300))
        log_init = np.log(init / max(init.sum(), 1e-300))
        log_prior = np.log(freq / max(freq.sum(), 1e-300))
    return PhoneModel(*(torch.from_numpy(a) for a in (log_trans, log_init, log_prior)))


def viterbi(log_emissions: ArrayLike, log_trans: ArrayLike, log_init: ArrayLike) -> np.ndarray:
    """Most likely state sequence (T,) of an HMM: O(T P^2) time, vectorised over states."""
    emissions = _as_numpy(log_emissions, np.float64)
    trans = _as_numpy(log_trans, np.float64)
    frames, states = emissions.shape
    if trans.shape != (states, states):
        raise ValueError(f"log_trans is {trans.shape}, expected {(states, states)}")
    if frames == 0:
        return np.zeros(0, dtype=np.int64)
    backpointers = np.zeros((frames, states), dtype=np.int64)
    score = _as_numpy(log_init, np.float64) + emissions[0]
    for t in range(1, frames):
        candidates = score[:, None] + trans  # from-state x to-state
        backpointers[t] = candidates.argmax(axis=0)
        score = candidates.max(axis=0) + emissions[t]
    path = np.empty(frames, dtype=np.int64)
    path[-1] = score.argmax()
    for t in range(frames - 1, 0, -1):
        path[t - 1] = backpointers[t, path[t]]
    return path


def collapse(frame_phones: ArrayLike, ignore: Iterable[int] = ()) -> list[int]:
    """Phone string of a frame labelling: repeats merged, then ``ignore``d phones dropped.

    Dropping after merging keeps "a sil a" as two a's, as a listener would hear them.
    """
    frames = _as_numpy(frame_phones, np.int64)
    if len(frames) == 0:
        return []
    keep = np.concatenate([[True], frames[1:] != frames[:-1]])
    skip = set(ignore)
    return [int(p) for p in frames[keep] if int(p) not in skip]


def edit_distance(ref: Sequence[int], hyp: Sequence[int]) -> tuple[int, int]:
    """Levenshtein distance (substitutions, deletions, insertions all cost 1) and len(ref)."""
    ref_a, hyp_a = np.asarray(ref), np.asarray(hyp)
    cols = np.arange(len(hyp_a) + 1)
    row = cols.copy()  # distances from an empty reference prefix
    for i in range(1, len(ref_a) + 1):
        sub_or_del = np.empty_like(row)
        sub_or_del[0] = i
        sub_or_del[1:] = np.minimum(row[:-1] + (hyp_a != ref_a[i - 1]), row[1:] + 1)
        # insertions: row[j] = min_k<=j (sub_or_del[k] + j - k), a running minimum
        row = np.minimum.accumulate(sub_or_del - cols) + cols
    return int(row[-1]), len(ref_a)


def decode_phones(
    log_probs: torch.Tensor,
    class_to_phone: torch.Tensor,
    model: PhoneModel,
    acoustic_scale: float = 1.0,
    prior_scale: float = 1.0,
) -> np.ndarray:
    """Best per-frame phone ids for one utterance's senone log posteriors (T x C).

    Emissions are ``acoustic_scale * (log p(phone|x) - prior_scale * log p(phone))``; a
    prior_scale of 0 uses raw posteriors.
    """
    phone_post = senone_to_phone_posteriors(
        log_probs.detach().double().cpu(), class_to_phone, model.num_phones
    )
    emissions = acoustic_scale * (phone_post - prior_scale * model.log_prior.double())
    return viterbi(emissions, model.log_trans, model.log_init)


def phone_error_rate(
    utterances: Iterable[tuple[torch.Tensor, ArrayLike]],
    class_to_phone: torch.Tensor,
    model: PhoneModel,
    acoustic_scale: float = 1.0,
    prior_scale: float = 1.0,
    ignore: Iterable[int] = (),
) -> PerResult:
    """PER over (senone log posteriors T x C, reference per-frame phone ids) pairs.

    ``ignore`` lists phone ids (e.g. silence) left out of both strings before scoring.
    """
    ignore = tuple(ignore)
    errors = ref_len = count = 0
    for log_probs, ref_frames in utterances:
        hyp = decode_phones(log_probs, class_to_phone, model, acoustic_scale, prior_scale)
        e, n = edit_distance(collapse(ref_frames, ignore), collapse(hyp, ignore))
        errors, ref_len, count = errors + e, ref_len + n, count + 1
    return PerResult(errors, ref_len, count)


def chance_accuracy(num_classes: int) -> float:
    """Frame accuracy of guessing uniformly among ``num_classes`` classes."""
    return 1.0 / num_classes


def majority_accuracy(train_targets: Targets, eval_targets: Targets) -> float:
    """Share of eval frames carrying the most frequent training label (always-guess baseline)."""
    train, evaluation = _flatten(train_targets), _flatten(eval_targets)
    if len(train) == 0 or len(evaluation) == 0:
        raise UsageError("majority_accuracy: empty target set")
    majority = np.bincount(train).argmax()
    return float((evaluation == majority).mean())


def _flatten(targets: Targets) -> np.ndarray:
    """One int array from an array or tensor, or an iterable or utt -> array mapping of them."""
    if isinstance(targets, torch.Tensor | np.ndarray):
        return _as_numpy(targets, np.int64).ravel()
    if isinstance(targets, Mapping):
        targets = targets.values()
    parts = [_as_numpy(t, np.int64).ravel() for t in targets]
    return np.concatenate(parts) if parts else np.zeros(0, dtype=np.int64)
