"""One RBM and its CD-1 training, as in Kaldi nnet1 (`steps/nnet/pretrain_dbn.sh`,
`rbm-train-cd1-frmshuff`), which produced the DBN the paper fine-tunes (its table "Comparing RBM
pretraining with random initialization"). The stack of RBMs is :mod:`modelavg.nets.dbn`.

Energies (hidden units are always Bernoulli, Gaussian visibles have unit variance)::

    Bernoulli visible:  E(v, h) = -b_v.v - b_h.h - h.W v
    Gaussian visible:   E(v, h) = |v - b_v|^2 / 2 - b_h.h - h.W v
    p(h=1 | v) = sigmoid(W v + b_h);  E[v | h] = W^T h + b_v  (sigmoid of it for Bernoulli)

CD-1 (one minibatch of N frames)::

    h+ = p(h | v+)                  positive statistics use probabilities
    s  ~ Bernoulli(h+)              the sample only drives the reconstruction
    v- = E[v | s]                   mean reconstruction: no Gaussian noise, no Bernoulli sampling
    h- = p(h | v-)
    grad_W = (h+^T v+ - h-^T v-) / N,  grad_bh = mean(h+ - h-),  grad_bv = mean(v+ - v-)

Update with momentum buffers (Kaldi `Rbm::RbmUpdate`; no L2 on biases)::

    dW = mmt * dW + lr * (grad_W - l2 * W);   W += dW

Nothing here communicates: a data-parallel driver averages ``rbm.parameters()`` between steps and
each worker keeps its own :class:`CD1Trainer` (momentum buffers stay local, as in the paper's NNs).

Example::

    rbm = RBM(440, 2048, "gaussian")
    trainer = CD1Trainer(rbm, CD1Config.for_visible_type("gaussian"), seed=0)
    for v in minibatches:          # 100 frames each (the recipe), globally mean/var normalised
        result = trainer.step(v)   # result.reconstruction_error, result.guard_fired, ...

A step never reads the device from the host (on a GPU each read waits for the stream): its
results are 0-dim tensors on the RBM's device, for the driver to sum and read when it logs, and
the guard applies itself with ``torch.where``. A NaN/Inf in CD-1 (Kaldi aborts on one) makes the
step's reconstruction error NaN/Inf, so a sum of errors shows it too.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any, Literal

import torch
from torch import nn
from torch.nn import functional as F

VisibleType = Literal["gaussian", "bernoulli"]
VISIBLE_TYPES: tuple[str, ...] = ("gaussian", "bernoulli")

# Defaults of Kaldi's steps/nnet/pretrain_dbn.sh.
L2 = 2e-4
LR_GAUSSIAN = 0.01  # rbm_lrate_low: first layer
LR_BERNOULLI = 0.4  # rbm_lrate: layers 2..
WEIGHT_STD = 0.1  # param_stddev(_first)
BIAS_PROB_EPS = 1e-4  # clamp for logit(p_active)


# --------------------------------------------------------------------------------------------------
# The RBM
# --------------------------------------------------------------------------------------------------


class RBM(nn.Module):
    """Bernoulli-hidden RBM with Gaussian (unit variance) or Bernoulli visibles.

    Parameters are plain ``nn.Parameter`` s (``weight`` H x V, ``hidden_bias`` H, ``visible_bias``
    V) so an averaging engine can flatten ``parameters()``; they are updated by CD-1 under
    ``no_grad``, never by autograd.
    """

    def __init__(
        self,
        visible_dim: int,
        hidden_dim: int,
        visible_type: VisibleType = "bernoulli",
        *,
        weight_std: float = WEIGHT_STD,
        generator: torch.Generator | None = None,
    ) -> None:
        super().__init__()
        if visible_type not in VISIBLE_TYPES:
            raise ValueError(f"visible_type {visible_type!r}: choose from {VISIBLE_TYPES}")
        if visible_dim <= 0 or hidden_dim <= 0:
            raise ValueError(f"RBM dims must be positive, got {visible_dim} x {hidden_dim}")
        self.visible_dim = visible_dim
        self.hidden_dim = hidden_dim
        self.visible_type: VisibleType = visible_type
        weight = torch.randn(hidden_dim, visible_dim, generator=generator) * weight_std
        self.weight = nn.Parameter(weight, requires_grad=False)
        self.hidden_bias = nn.Parameter(torch.zeros(hidden_dim), requires_grad=False)
        self.visible_bias = nn.Parameter(torch.zeros(visible_dim), requires_grad=False)

    @property
    def gaussian(self) -> bool:
        return self.visible_type == "gaussian"

    def hidden_probs(self, v: torch.Tensor) -> torch.Tensor:
        """p(h=1 | v) = sigmoid(v W^T + b_h), rows are frames."""
        return torch.sigmoid(F.linear(v, self.weight, self.hidden_bias))

    def visible_mean(self, h: torch.Tensor) -> torch.Tensor:
        """E[v | h] = h W + b_v (Gaussian) or sigmoid(h W + b_v) (Bernoulli)."""
        pre = torch.addmm(self.visible_bias, h, self.weight)
        return pre if self.gaussian else torch.sigmoid(pre)

    @torch.no_grad()
    def reconstruct(self, v: torch.Tensor) -> torch.Tensor:
        """Deterministic mean-field reconstruction E[v | h = p(h | v)]."""
        return self.visible_mean(self.hidden_probs(v))

    @torch.no_grad()
    def reconstruction_error(self, v: torch.Tensor) -> float:
        """Squared error per frame of v against its mean-field reconstruction (for monitoring)."""
        return float(squared_error_per_frame(v, self.reconstruct(v)))

    @torch.no_grad()
    def init_visible_bias_from_mean(
        self, mean_activation: torch.Tensor, eps: float = BIAS_PROB_EPS
    ) -> None:
        """b_v = logit(p) with p clamped to [eps, 1-eps]: with W ~ 0 the model's p(v=1) matches the
        data's mean activation from the layer below (Kaldi: "initialize biases to logit(p_active)").
        """
        if self.gaussian:
            raise ValueError("logit(p_active) bias init is for Bernoulli visibles only")
        p = mean_activation.detach().to(self.visible_bias).clamp(eps, 1.0 - eps)
        self.visible_bias.copy_(torch.logit(p))

    def extra_repr(self) -> str:
        return f"visible={self.visible_dim} ({self.visible_type}), hidden={self.hidden_dim}"


def squared_error_per_frame(v: torch.Tensor, recon: torch.Tensor) -> torch.Tensor:
    """sum_d (v - recon)^2 averaged over frames (rows): a 0-dim tensor on their device."""
    return (v - recon).pow(2).sum(dim=1).mean()


# --------------------------------------------------------------------------------------------------
# CD-1 statistics (pure math, no state)
# --------------------------------------------------------------------------------------------------


@dataclass
class CD1Stats:
    """Minibatch-averaged CD-1 gradient estimate (positive minus negative phase)."""

    weight: torch.Tensor
    hidden_bias: torch.Tensor
    visible_bias: torch.Tensor
    reconstruction: torch.Tensor  # v-, the negative-phase visibles


@torch.no_grad()
def cd1_statistics(rbm: RBM, v: torch.Tensor, generator: torch.Generator | None = None) -> CD1Stats:
    """One CD-1 pass; the gradients are averaged over the N frames (unlike DNN fine-tuning)."""
    pos_hid = rbm.hidden_probs(v)
    # a NaN (a diverged RBM) would stop bernoulli (on a GPU: a device-side assert); it shows in
    # the reconstruction error instead
    sample = torch.bernoulli(pos_hid.nan_to_num(0.0), generator=generator)
    neg_vis = rbm.visible_mean(sample)
    neg_hid = rbm.hidden_probs(neg_vis)
    n = v.shape[0]
    weight = (pos_hid.T @ v - neg_hid.T @ neg_vis) / n
    return CD1Stats(
        weight=weight,
        hidden_bias=(pos_hid - neg_hid).mean(dim=0),
        visible_bias=(v - neg_vis).mean(dim=0),
        reconstruction=neg_vis,
    )


# --------------------------------------------------------------------------------------------------
# Schedule
# --------------------------------------------------------------------------------------------------


@dataclass
class CD1Config:
    """Hyper-parameters of one RBM's CD-1 training (defaults: Kaldi's `pretrain_dbn.sh`).

    ``with_bug`` reproduces Kaldi's default ``--with-bug=true``: the momentum *used* is
    ``momentum_max`` from the first minibatch, while the lr factor (1 - ramped momentum) still goes
    0.5 -> 0.1. It defaults to True because the paper's DBN is the stock recipe's output, so this
    is what produced the models being re-created; False gives the intended ramp.

    ``guard_lr_decay_resets``: in Kaldi the guard's lr *= 0.9 acts on the *current* learning rate,
    which the schedule overwrites at the next momentum step (every ``momentum_step_frames``), so
    the decay is temporary. True reproduces that; False makes each decay permanent.
    """

    lr: float
    l2: float = L2
    momentum_start: float = 0.5
    momentum_max: float = 0.9
    momentum_steps: int = 40
    momentum_step_frames: int = 500_000
    with_bug: bool = True
    guard_ratio: float = 2.0  # fire when std(v-) > guard_ratio * std(v+); Gaussian visibles only
    guard_lr_decay: float = 0.9
    guard_lr_decay_resets: bool = True

    def __post_init__(self) -> None:
        if self.lr <= 0 or self.l2 < 0:
            raise ValueError(f"need lr > 0 and l2 >= 0, got lr={self.lr}, l2={self.l2}")
        if not 0 <= self.momentum_start <= self.momentum_max < 1:
            raise ValueError("need 0 <= momentum_start <= momentum_max < 1")
        if self.momentum_steps <= 0 or self.momentum_step_frames <= 0:
            raise ValueError("momentum_steps and momentum_step_frames must be positive")

    @classmethod
    def for_visible_type(cls, visible_type: VisibleType, **overrides: Any) -> CD1Config:
        """Recipe lr: 0.01 for the Gaussian first layer, 0.4 for Bernoulli layers."""
        lr = LR_GAUSSIAN if visible_type == "gaussian" else LR_BERNOULLI
        return cls(**{"lr": lr, **overrides})


def ramp_index(frames_seen: int, cfg: CD1Config) -> int:
    """Number of completed ramp steps: floor(frames / step_frames), capped at momentum_steps."""
    return min(frames_seen // cfg.momentum_step_frames, cfg.momentum_steps)


def ramp_momentum(frames_seen: int, cfg: CD1Config) -> float:
    """m(f) = m0 + (m_max - m0) * min(floor(f / 500k), 40) / 40: 0.5 -> 0.9 over 20M frames."""
    k = ramp_index(frames_seen, cfg)
    return cfg.momentum_start + (cfg.momentum_max - cfg.momentum_start) * k / cfg.momentum_steps


def schedule(frames_seen: int, cfg: CD1Config, lr: float | None = None) -> tuple[float, float]:
    """(momentum used, lr used) for the minibatch that starts after ``frames_seen`` frames.

    lr_used = lr * (1 - m(f)) keeps the momentum-amplified step lr / (1 - m) constant; with the
    bug the momentum used is m_max throughout, so early steps are 5x larger than intended.
    """
    m = ramp_momentum(frames_seen, cfg)
    used = cfg.momentum_max if cfg.with_bug else m
    return used, (cfg.lr if lr is None else lr) * (1.0 - m)


# --------------------------------------------------------------------------------------------------
# The trainer: momentum buffers, schedule state, explosion guard
# --------------------------------------------------------------------------------------------------


@dataclass
class StepResult:
    """One step's numbers; all but ``momentum`` (the host's schedule) are 0-dim tensors on the
    RBM's device, left unread (a read waits for the device)."""

    reconstruction_error: torch.Tensor  # squared error per frame of v+ vs the CD-1 recon. v-;
    # NaN/Inf when v+ or v- holds a NaN/Inf (or the error overflows float32)
    momentum: float
    lr: torch.Tensor  # float64: lr used (or that would have been used, if the guard fired)
    guard_fired: torch.Tensor  # bool; always False for Bernoulli visibles
    guard_scale: torch.Tensor  # float64 std(v+) / std(v-) applied to W and both biases, else 1


class CD1Trainer:
    """Stateful CD-1 training of one RBM.

    State: momentum buffers, base lr (lowered by the guard), frames seen (drives the ramp), RNG.
    ``frames_seen`` counts this trainer's frames; a data-parallel driver that wants the ramp to
    follow the global frame count may add the other workers' frames to it. What the guard
    changes (``lr``, ``lr_scale``) are float64 0-dim tensors on the RBM's device.
    """

    def __init__(self, rbm: RBM, config: CD1Config | None = None, seed: int | None = None) -> None:
        self.rbm = rbm
        self.config = config or CD1Config.for_visible_type(rbm.visible_type)
        device = rbm.weight.device
        self.lr = torch.tensor(self.config.lr, dtype=torch.float64, device=device)
        # product of guard decays since the last ramp step
        self.lr_scale = torch.ones((), dtype=torch.float64, device=device)
        # every Bernoulli step's guard_fired and guard_scale (shared: the guard never fires)
        self._unguarded = (torch.zeros((), dtype=torch.bool, device=device), self.lr_scale.clone())
        self.frames_seen = 0
        self._ramp_period = 0
        self.generator = torch.Generator(device=device)
        if seed is None:
            self.generator.seed()
        else:
            self.generator.manual_seed(seed)
        self.buffers = {name: torch.zeros_like(p) for name, p in self._params().items()}

    def _params(self) -> dict[str, nn.Parameter]:
        return {
            "weight": self.rbm.weight,
            "hidden_bias": self.rbm.hidden_bias,
            "visible_bias": self.rbm.visible_bias,
        }

    def current_schedule(self) -> tuple[float, torch.Tensor]:
        """(momentum, lr) the next step will use, including any temporary guard decay."""
        momentum, lr = schedule(self.frames_seen, self.config, self.lr)
        return momentum, lr * self.lr_scale

    @torch.no_grad()
    def step(self, v: torch.Tensor) -> StepResult:
        """One CD-1 update on the minibatch ``v`` (frames x visible_dim); no host read."""
        weight = self.rbm.weight
        if (v.device, v.dtype) != (weight.device, weight.dtype):  # pass v on the device: no copy
            v = v.to(weight)
        self._maybe_reset_guard_decay()
        momentum, lr = self.current_schedule()
        stats = cd1_statistics(self.rbm, v, self.generator)
        error = squared_error_per_frame(v, stats.reconstruction)
        self.frames_seen += v.shape[0]
        if not self.rbm.gaussian:
            self._apply_update(stats, momentum, lr)
            return StepResult(error, momentum, lr, *self._unguarded)
        fired, scale = self._guard(v, stats.reconstruction)
        self._apply_update(stats, momentum, lr, fired, scale)
        return StepResult(error, momentum, lr, fired, scale)

    def _maybe_reset_guard_decay(self) -> None:
        """Kaldi re-sets the lr every momentum_step_frames (also after the ramp ends), which
        undoes the guard's temporary decay."""
        period = self.frames_seen // self.config.momentum_step_frames
        if period != self._ramp_period:
            self._ramp_period = period
            if self.config.guard_lr_decay_resets:
                self.lr_scale.fill_(1.0)

    def _guard(self, v: torch.Tensor, recon: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """If std(v-) > 2 std(v+) the Gaussian RBM is blowing up: shrink W, b_h, b_v by
        std(v+)/std(v-), lr *= 0.9, zero the momentum, skip the update (``_apply_update`` does
        the shrink, zeroing and skip). Returns (fired, scale), scale 1 when not fired."""
        data_std = v.std(correction=0).double()
        recon_std = recon.std(correction=0).double()
        fired = recon_std > self.config.guard_ratio * data_std
        scale = torch.where(fired, data_std / recon_std, 1.0)
        decay = self.config.guard_lr_decay
        decayed = self.lr_scale if self.config.guard_lr_decay_resets else self.lr
        torch.where(fired, decayed * decay, decayed, out=decayed)
        return fired, scale

    def _apply_update(
        self,
        stats: CD1Stats,
        momentum: float,
        lr: torch.Tensor,
        fired: torch.Tensor | None = None,
        scale: torch.Tensor | None = None,
    ) -> None:
        """buf = m * buf + lr * (grad - l2 * W) (no L2 on biases); param += buf. When the guard
        ``fired``: buf = 0 and param *= scale instead (selected on the device, not read)."""
        grads = {
            "weight": stats.weight,
            "hidden_bias": stats.hidden_bias,
            "visible_bias": stats.visible_bias,
        }
        dtype = self.rbm.weight.dtype  # a Python lr would be rounded to it too
        alpha, l2_alpha = lr.to(dtype), (lr * -self.config.l2).to(dtype)
        shrink = None if scale is None else scale.to(dtype)
        for name, p in self._params().items():
            buf = self.buffers[name]
            buf.mul_(momentum).addcmul_(grads[name], alpha)  # one rounding, as add_(alpha=lr)
            if name == "weight" and self.config.l2:
                buf.addcmul_(p, l2_alpha)
            if fired is None:
                p.add_(buf)
            else:  # p = p * shrink + buf: p + buf when not fired (shrink 1), p * shrink if fired
                buf.masked_fill_(fired, 0.0)
                torch.addcmul(buf, p, shrink, out=p)

    def state_dict(self) -> dict[str, Any]:
        """Everything a resume needs besides the RBM's own parameters (reads lr and lr_scale)."""
        return {
            "config": asdict(self.config),
            "buffers": {k: b.detach().clone() for k, b in self.buffers.items()},
            "lr": self.lr.item(),
            "lr_scale": self.lr_scale.item(),
            "frames_seen": self.frames_seen,
            "ramp_period": self._ramp_period,
            "rng_state": self.generator.get_state(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.config = CD1Config(**state["config"])
        for name, buf in self.buffers.items():
            buf.copy_(state["buffers"][name])
        self.lr.fill_(float(state["lr"]))
        self.lr_scale.fill_(float(state["lr_scale"]))
        self.frames_seen = int(state["frames_seen"])
        self._ramp_period = int(state["ramp_period"])
        self.generator.set_state(state["rng_state"].cpu())  # a CPU ByteTensor, even for CUDA
