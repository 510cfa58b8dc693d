"""Phone decoding: Viterbi, edit distance, posterior pooling and PER on synthetic posteriors."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch

from modelavg.errors import UsageError
from modelavg.phones import (
    PhoneModel,
    chance_accuracy,
    collapse,
    decode_phones,
    edit_distance,
    estimate_phone_bigram,
    load_class_map,
    majority_accuracy,
    phone_error_rate,
    senone_to_phone_posteriors,
    viterbi,
)


def _path_score(path, emissions, trans, init) -> float:
    score = init[path[0]] + emissions[0, path[0]]
    for t in range(1, len(path)):
        score += trans[path[t - 1], path[t]] + emissions[t, path[t]]
    return float(score)


@pytest.mark.parametrize("seed", range(8))
def test_viterbi_matches_brute_force(seed):
    rng = np.random.default_rng(seed)
    frames, states = int(rng.integers(1, 6)), int(rng.integers(1, 4))
    emissions = rng.normal(size=(frames, states))
    trans = np.log(rng.dirichlet(np.ones(states), size=states))
    init = np.log(rng.dirichlet(np.ones(states)))
    best = max(
        itertools.product(range(states), repeat=frames),
        key=lambda p: _path_score(p, emissions, trans, init),
    )
    path = viterbi(torch.from_numpy(emissions), trans, init)
    assert path.shape == (frames,)
    assert _path_score(path, emissions, trans, init) == pytest.approx(
        _path_score(best, emissions, trans, init)
    )
    assert tuple(path) == best  # random reals: the best path is unique


def test_viterbi_respects_forbidden_transitions():
    emissions = np.log(np.array([[0.9, 0.1], [0.1, 0.9], [0.9, 0.1]]))
    trans = np.log(np.array([[1.0, 0.0], [0.0, 1.0]]) + 1e-300)
    path = viterbi(emissions, trans, np.log([0.5, 0.5]))
    assert set(path.tolist()) in ({0}, {1})
    assert viterbi(np.zeros((0, 2)), trans, np.zeros(2)).shape == (0,)


@pytest.mark.parametrize(
    ("ref", "hyp", "errors"),
    [
        ([], [], 0),
        ([1, 2, 3], [1, 2, 3], 0),
        ([1, 2, 3], [], 3),
        ([], [4, 5], 2),
        ([1, 2, 3], [1, 3], 1),
        ([1, 2, 3], [1, 4, 3], 1),
        ([1, 2, 3], [0, 1, 2, 3], 1),
        ([1, 2, 3, 4], [2, 1, 4, 3], 3),
        (list("kitten"), list("sitting"), 3),
        (list("sunday"), list("saturday"), 3),
    ],
)
def test_edit_distance_known_cases(ref, hyp, errors):
    codes = {c: i for i, c in enumerate(sorted(set(ref) | set(hyp), key=str))}
    assert edit_distance([codes[c] for c in ref], [codes[c] for c in hyp]) == (errors, len(ref))


def test_edit_distance_matches_reference_dp():
    rng = np.random.default_rng(0)
    for _ in range(50):
        ref = rng.integers(0, 4, size=int(rng.integers(0, 9))).tolist()
        hyp = rng.integers(0, 4, size=int(rng.integers(0, 9))).tolist()
        table = np.zeros((len(ref) + 1, len(hyp) + 1), dtype=int)
        table[:, 0], table[0, :] = np.arange(len(ref) + 1), np.arange(len(hyp) + 1)
        for i, j in itertools.product(range(1, len(ref) + 1), range(1, len(hyp) + 1)):
            table[i, j] = min(
                table[i - 1, j] + 1,
                table[i, j - 1] + 1,
                table[i - 1, j - 1] + (ref[i - 1] != hyp[j - 1]),
            )
        assert edit_distance(ref, hyp) == (table[-1, -1], len(ref))


def test_collapse_merges_repeats_then_drops_ignored():
    assert collapse([3, 3, 1, 1, 1, 0, 0, 1, 2]) == [3, 1, 0, 1, 2]
    assert collapse(np.array([0, 1, 1, 0, 1, 0]), ignore=[0]) == [1, 1]
    assert collapse(torch.tensor([], dtype=torch.long)) == []


def test_senone_to_phone_posteriors_is_logsumexp_per_phone():
    torch.manual_seed(0)
    class_to_phone = torch.tensor([2, 0, 2, 1, 0, 2])
    logits = torch.randn(7, 6) * 3
    logits[0, [0, 2, 5]] = -1e4  # a phone whose senones are all nearly impossible
    log_probs = torch.log_softmax(logits, dim=1)
    phone = senone_to_phone_posteriors(log_probs, class_to_phone, num_phones=4)
    assert phone.shape == (7, 4)
    for p in range(3):
        expected = torch.logsumexp(log_probs[:, class_to_phone == p], dim=1)
        torch.testing.assert_close(phone[:, p], expected)
    assert torch.isneginf(phone[:, 3]).all()  # no class maps to phone 3
    torch.testing.assert_close(torch.logsumexp(phone[:, :3], dim=1), torch.zeros(7))


def test_estimate_phone_bigram_counts_frames():
    model = estimate_phone_bigram([np.array([0, 0, 0, 1]), torch.tensor([1, 1])], 3, smoothing=0.0)
    trans = model.log_trans.exp()
    torch.testing.assert_close(trans[0], torch.tensor([2 / 3, 1 / 3, 0.0], dtype=torch.float64))
    torch.testing.assert_close(trans[1], torch.tensor([0.0, 1.0, 0.0], dtype=torch.float64))
    assert torch.isneginf(model.log_trans[2]).all()  # never seen, no smoothing
    torch.testing.assert_close(model.log_init.exp(), torch.tensor([0.5, 0.5, 0.0]).double())
    torch.testing.assert_close(model.log_prior.exp(), torch.tensor([0.5, 0.5, 0.0]).double())
    smoothed = estimate_phone_bigram([[0, 0, 0, 1]], 3)
    torch.testing.assert_close(smoothed.log_trans.exp().sum(1), torch.ones(3).double())
    assert torch.isfinite(smoothed.log_trans).all()
    with pytest.raises(UsageError):
        estimate_phone_bigram([[0, 5]], 3)


def _synthetic_task(seed: int, noise: float):
    """Phones 0..4, two senones each; utterances of random phones lasting 6-14 frames each."""
    rng = np.random.default_rng(seed)
    num_phones, per_phone = 5, 2
    class_to_phone = torch.arange(num_phones).repeat_interleave(per_phone)

    def utterance():
        phones = [int(rng.integers(num_phones))]
        while len(phones) < 8:
            p = int(rng.integers(num_phones))
            if p != phones[-1]:
                phones.append(p)
        return np.repeat(phones, rng.integers(6, 15, size=len(phones)))

    def posteriors(frames):
        logits = rng.normal(scale=noise, size=(len(frames), num_phones * per_phone))
        senone = frames * per_phone + rng.integers(per_phone, size=len(frames))
        logits[np.arange(len(frames)), senone] += 3.0
        return torch.log_softmax(torch.from_numpy(logits), dim=1)

    return class_to_phone, num_phones, utterance, posteriors


def test_decoding_noisy_posteriors_recovers_phone_sequence():
    class_to_phone, num_phones, utterance, posteriors = _synthetic_task(0, noise=1.0)
    model = estimate_phone_bigram([utterance() for _ in range(200)], num_phones)
    refs = [utterance() for _ in range(10)]
    utts = [(posteriors(r), r) for r in refs]
    framewise_wrong = sum(
        int((senone_to_phone_posteriors(lp, class_to_phone).argmax(1).numpy() != r).sum())
        for lp, r in utts
    )
    assert framewise_wrong > 0  # the noise really flips frames
    framewise_errors = sum(
        edit_distance(
            collapse(r), collapse(senone_to_phone_posteriors(lp, class_to_phone).argmax(1))
        )[0]
        for lp, r in utts
    )
    result = phone_error_rate(utts, class_to_phone, model)
    assert framewise_errors > result.ref_len / 2  # without the HMM, flipped frames are insertions
    assert (result.errors, result.num_utts) == (0, 10)
    assert result.ref_len == sum(len(collapse(r)) for r in refs)
    assert result.per == 0.0

    uniform = [(torch.full((len(r), 10), -np.log(10.0)), r) for r in refs]
    assert phone_error_rate(uniform, class_to_phone, model).per > 0.5


def test_decode_phones_scales():
    class_to_phone = torch.tensor([0, 1])
    model = PhoneModel(
        log_trans=torch.log(torch.tensor([[0.5, 0.5], [0.5, 0.5]], dtype=torch.float64)),
        log_init=torch.log(torch.tensor([0.5, 0.5], dtype=torch.float64)),
        log_prior=torch.log(torch.tensor([0.9, 0.1], dtype=torch.float64)),
    )
    log_probs = torch.log(torch.tensor([[0.6, 0.4]]))
    assert decode_phones(log_probs, class_to_phone, model, prior_scale=0.0).tolist() == [0]
    # dividing by the prior favours the rare phone: 0.4 / 0.1 > 0.6 / 0.9
    assert decode_phones(log_probs, class_to_phone, model).tolist() == [1]


def test_baselines():
    assert chance_accuracy(4) == 0.25
    train = {"a": np.array([1, 1, 2]), "b": np.array([1, 3])}
    assert majority_accuracy(train, [np.array([1, 2]), np.array([1, 1])]) == 0.75
    assert majority_accuracy(torch.tensor([0, 0, 5]), np.array([5, 5])) == 0.0
    with pytest.raises(UsageError):
        majority_accuracy([], [1])


def test_load_class_map(tmp_path):
    (tmp_path / "phones.txt").write_text("0 AA\n1 SIL\n")
    (tmp_path / "classes.txt").write_text("0 96 SIL\n1 157 AA\n2 183 AA\n")
    class_to_phone, names = load_class_map(tmp_path)
    assert names == ["AA", "SIL"]
    assert class_to_phone.tolist() == [1, 0, 0]
    assert class_to_phone.dtype == torch.long
    (tmp_path / "classes.txt").write_text("0 96 SIL\n1 157 ZZ\n")
    with pytest.raises(UsageError, match="classes.txt"):
        load_class_map(tmp_path)
    with pytest.raises(UsageError, match="no such file"):
        load_class_map(tmp_path / "missing")
