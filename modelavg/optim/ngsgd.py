"""Kaldi-style natural-gradient SGD on every ``nn.Linear``: :class:`NGSGD`.

Each affine layer is updated as Kaldi nnet2's ``AffineComponentPreconditionedOnline::Update``
(src/nnet2/nnet-component.cc, 2014): the inputs ``x̃ = [x, 1]`` and the output derivatives are
preconditioned by two :class:`~modelavg.optim.fisher.OnlineNaturalGradient` estimates, the step
``-lr·γ_in·γ_out·P_outᵀ P_in`` is capped by the per-frame max-change, and other parameters get
plain SGD.  ``variant`` chooses whose Fisher estimate (nnet2's, the paper's, or nnet3's); the
affine update and max-change are nnet2's for both (docs/NGSGD.md).

Units: the trainer's loss is mean-reduced, so the captured ``dL/dy`` rows are per-frame
derivatives divided by N.  NGSGD multiplies them by N (``reduction="mean"``) so that the Fisher
statistics and max-change are per frame as in Kaldi, and divides the learning rate by N, so ``lr``
means exactly what it means for ``torch.optim.SGD`` on the mean loss: with preconditioning and
max-change off, NGSGD *is* SGD.  Kaldi's summed-gradient learning rate ``lr_kaldi`` therefore
corresponds to ``lr = N·lr_kaldi`` (0.32 at N=1024 → 328).  Max-change uses the learning rate
actually applied (Kaldi's intent), not the paper's nnet1 port's lr-free bound (docs/NGSGD.md).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from modelavg.optim.fisher import VARIANTS, OnlineNaturalGradient, apply_updates, work_dtype


@dataclass
class _Capture:
    """One forward of one layer: its input rows, and later the derivative of its output."""

    x: Tensor
    grad: Tensor | None = None


@dataclass
class _Layer:
    name: str
    module: nn.Linear
    pre_in: OnlineNaturalGradient
    pre_out: OnlineNaturalGradient
    capture: _Capture | None = None
    handles: list[Any] = field(default_factory=list)
    weight_grad_off: bool = False  # autograd was told not to form weight.grad for this forward
    last_scale: Tensor | None = field(default=None, repr=False)


class NGSGD(torch.optim.Optimizer):
    """Natural-gradient SGD on every ``nn.Linear`` of ``model``, plain SGD on other parameters.

    For a layer y = W x + b with inputs x̃ = [x, 1] (N×(I+1)) and per-frame output derivatives Δ
    (N×O), each side is preconditioned by its own :class:`OnlineNaturalGradient`
    (P_in, γ_in; P_out, γ_out) and the step is Kaldi nnet2's

        [ΔW, Δb] = -(lr/N) · m · γ_in γ_out · P_outᵀ P_in,

    with the bias taken from the preconditioned ones-column and the max-change factor
    m = min(1, max_change·N / bound), bound = (lr/N)·γ_in γ_out·Σ_i ‖p_in,i‖·‖p_out,i‖ (a bound
    on ‖ΔW‖_F).  ``lr`` is the learning rate of ``torch.optim.SGD`` on the mean loss (see the
    module docstring; ``reduction="sum"`` drops the 1/N for a summed loss).

    Activations are captured by a forward hook (input) and a tensor hook on the output (dL/dy);
    unlike a full backward hook this keeps in-place activations after the layer legal.  One
    forward and one backward per ``step()``; gradient accumulation raises.

    Cost: P_outᵀ P_in is a matrix product of exactly the shape of the weight gradient Δᵀx̃, and
    it replaces it.  So while a layer is trained by NG the forward pre-hook has autograd skip
    ``weight.grad`` (``requires_grad`` is off only while the layer's forward records the graph,
    and only when the output still needs a gradient through the input or the bias).  The extra
    work per layer is then forming P_in and P_out, about 2·N·(R_in·(I+1) + R_out·O) multiply-adds
    against the 3·N·O·(I+1) of forward and backward.  ``weight.grad`` of such layers stays
    ``None``: gradient clipping, L2 terms added to ``.grad`` and DDP's gradient allreduce do not
    reach NG layers (NG-SGD is a local optimiser here, as in the paper: replicas are averaged).

    ``momentum`` (0 in Kaldi's NG component and in the paper) follows torch.optim.SGD:
    buf = μ·buf + d, p -= lr·buf, with d the gradient, or for a Linear layer the scaled
    natural-gradient direction m·γ_in·γ_out·P_outᵀP_in/N.  ``precondition=False`` keeps only
    max-change; with ``max_change=0`` as well the update is exactly torch.optim.SGD's (autograd's
    gradients, no hooks needed).  ``variant`` ("nnet2", "nnet3") chooses both sides' Fisher
    estimates (:mod:`modelavg.optim.fisher`).

    Example::

        opt = NGSGD(model, lr=0.5)          # Kaldi defaults: ranks 20/80, max-change 0.075
        loss = F.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    """

    def __init__(
        self,
        model: nn.Module,
        lr: float,
        rank_in: int = 20,
        rank_out: int = 80,
        update_period: int = 4,
        num_samples_history: float = 2000.0,
        alpha: float = 4.0,
        max_change: float = 0.075,
        momentum: float = 0.0,
        *,
        precondition: bool = True,
        reduction: str = "mean",
        variant: str = "nnet2",
    ) -> None:
        if lr < 0 or momentum < 0 or max_change < 0:
            raise ValueError(
                f"need lr, momentum, max_change >= 0; got {lr}, {momentum}, {max_change}"
            )
        if reduction not in ("mean", "sum"):
            raise ValueError(f"reduction must be 'mean' or 'sum', got {reduction!r}")
        if variant not in VARIANTS:
            raise ValueError(f"variant must be one of {VARIANTS}, got {variant!r}")
        params = [p for p in model.parameters() if p.requires_grad]
        super().__init__(params, {"lr": lr, "momentum": momentum})
        self.max_change = float(max_change)
        self.precondition = precondition
        self.reduction = reduction
        config = {
            "update_period": update_period,
            "num_samples_history": num_samples_history,
            "alpha": alpha,
            "variant": variant,
        }
        self._layers: list[_Layer] = []
        for name, module in model.named_modules():
            if isinstance(module, nn.Linear) and module.weight.requires_grad:
                dim_in = module.in_features + (module.bias is not None)
                layer = _Layer(
                    name,
                    module,
                    OnlineNaturalGradient(dim_in, rank_in, **config),
                    OnlineNaturalGradient(module.out_features, rank_out, **config),
                )
                if self._uses_captures:
                    layer.handles = [
                        module.register_forward_pre_hook(
                            self._make_pre_hook(layer), with_kwargs=True
                        ),
                        module.register_forward_hook(
                            self._make_forward_hook(layer), with_kwargs=True
                        ),
                    ]
                self._layers.append(layer)
        self._by_weight = {id(layer.module.weight): layer for layer in self._layers}
        self._biases = {
            id(layer.module.bias) for layer in self._layers if layer.module.bias is not None
        }

    @property
    def _uses_captures(self) -> bool:
        """False only for plain SGD (no preconditioning, no max-change): autograd's grads do."""
        return self.precondition or self.max_change > 0

    # ----------------------------------------------------------------------------- hooks
    @staticmethod
    def _make_pre_hook(layer: _Layer):
        def hook(module: nn.Module, args: tuple[Tensor, ...], kwargs: dict[str, Any]) -> None:
            weight, bias = module.weight, module.bias
            x = args[0] if args else kwargs["input"]
            keeps_graph = x.requires_grad or (bias is not None and bias.requires_grad)
            if torch.is_grad_enabled() and weight.requires_grad and keeps_graph:
                weight.requires_grad_(False)  # NG forms the weight step from P_out, P_in
                layer.weight_grad_off = True

        return hook

    def _make_forward_hook(self, layer: _Layer):
        def hook(
            module: nn.Module, args: tuple[Tensor, ...], kwargs: dict[str, Any], output: Tensor
        ) -> Tensor | None:
            if layer.weight_grad_off:
                module.weight.requires_grad_(True)
                layer.weight_grad_off = False
            if not (torch.is_grad_enabled() and output.requires_grad):
                return None  # evaluation, or a frozen sub-graph: nothing to train
            if layer.capture is not None and layer.capture.grad is not None:
                raise RuntimeError(
                    f"NGSGD: layer {layer.name!r} ran forward again after its backward without "
                    "step(); NGSGD supports one forward and one backward per step (no gradient "
                    "accumulation)"
                )
            capture = _Capture((args[0] if args else kwargs["input"]).detach())
            layer.capture = capture
            if output._is_view():
                # N-D inputs give a view of the 2-D product; an in-place op on a view (say
                # ReLU(inplace=True)) re-routes autograd around hooks registered on it.
                output = output.clone()
            output.register_hook(self._make_grad_hook(layer, capture))
            return output

        return hook

    @staticmethod
    def _make_grad_hook(layer: _Layer, capture: _Capture):
        def hook(grad: Tensor) -> None:
            if layer.capture is not capture or capture.grad is not None:
                raise RuntimeError(
                    f"NGSGD: layer {layer.name!r} was called more than once per step (shared "
                    "layer, or several backward passes); NGSGD needs exactly one call"
                )
            capture.grad = grad.detach()

        return hook

    def remove_hooks(self) -> None:
        """Detach from the model; later steps would then raise for lack of captures."""
        for layer in self._layers:
            for handle in layer.handles:
                handle.remove()
            layer.handles = []
            layer.capture = None

    def zero_grad(self, set_to_none: bool = True) -> None:
        """Also drop captures whose backward already ran (their gradient is being discarded)."""
        super().zero_grad(set_to_none=set_to_none)
        for layer in self._layers:
            if layer.capture is not None and layer.capture.grad is not None:
                layer.capture = None

    # ----------------------------------------------------------------------------- state
    def reset_preconditioners(self) -> None:
        """Re-initialise every Fisher estimate (the paper's implementation does so every epoch)."""
        for layer in self._layers:
            layer.pre_in.reset()
            layer.pre_out.reset()

    @property
    def estimates_ready(self) -> bool:
        """Whether every preconditioner has its estimate (after the first step; after a reset
        not until the next)."""
        return self.precondition and all(
            pre.ready for layer in self._layers for pre in (layer.pre_in, layer.pre_out)
        )

    def preconditioners(self) -> dict[str, tuple[OnlineNaturalGradient, OnlineNaturalGradient]]:
        """{layer name: (input-side, output-side)} preconditioners."""
        return {layer.name: (layer.pre_in, layer.pre_out) for layer in self._layers}

    def last_max_change_scales(self) -> dict[str, float]:
        """{layer name: m} of the last step (1.0 = max-change not active)."""
        return {
            layer.name: float(layer.last_scale)
            for layer in self._layers
            if layer.last_scale is not None
        }

    def state_dict(self) -> dict[str, Any]:
        """torch's optimizer state plus the preconditioners (kept out of ``state``, which
        ``Optimizer.load_state_dict`` would cast to the parameters' dtype)."""
        state = super().state_dict()
        state["ngsgd"] = {
            layer.name: {"in": layer.pre_in.state_dict(), "out": layer.pre_out.state_dict()}
            for layer in self._layers
        }
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        state_dict = dict(state_dict)
        ngsgd = state_dict.pop("ngsgd", None)
        super().load_state_dict(state_dict)
        if ngsgd is None:
            return
        missing = {layer.name for layer in self._layers} - set(ngsgd)
        if missing:
            raise ValueError(f"NGSGD state has no preconditioners for layers {sorted(missing)}")
        for layer in self._layers:
            layer.pre_in.load_state_dict(ngsgd[layer.name]["in"])
            layer.pre_out.load_state_dict(ngsgd[layer.name]["out"])

    # ----------------------------------------------------------------------------- the step
    @torch.no_grad()
    def step(self, closure=None):  # noqa: ANN001 - torch's signature
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            lr, momentum = group["lr"], group["momentum"]
            for p in group["params"]:
                layer = self._by_weight.get(id(p))
                if layer is not None:
                    self._linear_step(layer, lr, momentum)
                elif p.grad is not None and id(p) not in self._biases:
                    self._sgd(p, p.grad, lr, momentum)
        # every layer's estimate update at once: the step's one wait for the device
        apply_updates(pre for layer in self._layers for pre in (layer.pre_in, layer.pre_out))
        for layer in self._layers:
            layer.capture = None
        return loss

    def _sgd(self, p: Tensor, direction: Tensor, lr: float, momentum: float) -> None:
        """torch.optim.SGD's update: buf = μ·buf + g (buf = g at first), p -= lr·buf."""
        if momentum:
            buf = self.state[p].get("momentum_buffer")
            if buf is None:
                buf = self.state[p]["momentum_buffer"] = direction.detach().clone()
            else:
                buf.mul_(momentum).add_(direction)
            direction = buf
        p.add_(direction, alpha=-lr)

    def _linear_step(self, layer: _Layer, lr: float, momentum: float) -> None:
        """One layer's NG (or max-change-only) step; a layer the backward did not reach is left."""
        weight, bias = layer.module.weight, layer.module.bias
        capture = layer.capture
        if not self._uses_captures:
            if weight.grad is not None:
                self._sgd(weight, weight.grad, lr, momentum)  # exactly torch.optim.SGD
            if bias is not None and bias.grad is not None:
                self._sgd(bias, bias.grad, lr, momentum)
            return
        if capture is None or capture.grad is None:
            if weight.grad is not None:
                raise RuntimeError(
                    f"NGSGD: layer {layer.name!r} has a gradient but no captured forward/backward "
                    "(hooks removed, forward under no_grad, or the module's forward() bypassed, "
                    "as in nn.MultiheadAttention.out_proj)"
                )
            return
        dtype = work_dtype(weight.dtype)
        x = capture.x.reshape(-1, layer.module.in_features).to(dtype)
        n = x.shape[0]
        per_frame = float(n) if self.reduction == "mean" else 1.0
        delta = capture.grad.reshape(-1, layer.module.out_features).to(dtype) * per_frame
        if bias is not None:
            x = torch.cat([x, x.new_ones(n, 1)], dim=1)  # x̃ = [x, 1]
        if self.precondition:
            p_in, g_in, in_sq = layer.pre_in.precondition_parts(x, defer=True)
            p_out, g_out, out_sq = layer.pre_out.precondition_parts(delta, defer=True)
            s = g_in * g_out
        else:
            p_in, p_out, s = x, delta, x.new_ones(())
            in_sq = torch.linalg.vector_norm(x, dim=1).square()
            out_sq = torch.linalg.vector_norm(delta, dim=1).square()
        layer.last_scale = self._max_change_scale(in_sq, out_sq, s, lr / per_frame, n)
        # direction = k·P_outᵀ P_in (weight.grad units), k = 1/N for a mean loss
        coef = s * layer.last_scale / per_frame
        i = layer.module.in_features
        train_bias = bias is not None and bias.requires_grad
        if momentum:
            direction = (p_out * coef.to(p_out)).T @ p_in
            self._sgd(weight, direction[:, :i].to(weight.dtype), lr, momentum)
            if train_bias:
                self._sgd(bias, direction[:, i].to(bias.dtype), lr, momentum)
        else:  # weight += (-lr·coef·P_out)ᵀ P_in in one fused product
            scaled = (p_out * (-lr * coef).to(p_out)).T
            weight.addmm_(scaled.to(weight.dtype), p_in[:, :i].to(weight.dtype))
            if train_bias:
                bias.addmv_(scaled.to(bias.dtype), p_in[:, i].to(bias.dtype))

    def _max_change_scale(
        self, in_sq: Tensor, out_sq: Tensor, s: Tensor, lr_frame: float, n: int
    ) -> Tensor:
        """m = min(1, max_change·N / bound), bound = lr_frame·s·Σ_i ‖p_in,i‖·‖p_out,i‖ ≥ ‖ΔW‖_F.

        ``in_sq``/``out_sq`` are the squared row norms of P_in and P_out (before γ).
        """
        one = s.new_ones(())
        if self.max_change <= 0:
            return one
        bound = lr_frame * s * (in_sq * out_sq).sqrt().sum()
        limit = self.max_change * n
        return torch.where(bound > limit, limit / bound.clamp_min(limit), one)
