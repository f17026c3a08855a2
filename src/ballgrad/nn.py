"""Ballify modules (DESIGN.md §5): replace a module's parameters by ``nn.Parameter``s holding BallTensors.

After ``ballify(model)``, the forward pass, ``loss.backward()``, ``torch.autograd.grad`` and the optimizers run as
usual; midpoints are bit-identical to the plain model and every ``.grad`` is a BallTensor containing the exact
gradient. ``unballify(model)`` turns the parameters back into plain midpoints.
"""

from __future__ import annotations

import math
import numbers
from typing import Callable, Union

import torch
from torch import nn

from ballgrad.tensor import BallTensor, ball

RadiusSpec = Union[float, torch.Tensor, dict, Callable[[str, torch.Tensor], object]]


class PlainGradientError(RuntimeError):
    """A plain tensor reached ``.grad`` of a ballified parameter: some op ran outside ballgrad (a bug to report)."""


def _radius_for(name: str, param: torch.Tensor, rad: RadiusSpec):
    if callable(rad) and not isinstance(rad, torch.Tensor):
        try:
            value = rad(name, param)
        except TypeError:
            value = rad(param)
    elif isinstance(rad, dict):
        value = rad.get(name, 0.0)
    else:
        value = rad
    if isinstance(value, numbers.Real) and not isinstance(value, bool):
        if value < 0 or math.isnan(value):
            raise ValueError(f"radius for {name} must be a non-negative number, got {value}")
        return None if value == 0 else float(value)
    if isinstance(value, torch.Tensor):
        return value.detach()
    if value is None:
        return None
    raise TypeError(f"radius for {name}: expected a float, a tensor or None, got {type(value).__name__}")


def _check_grad_is_ball(name: str):
    def hook(param):
        g = param.grad
        if g is not None and not isinstance(g, BallTensor):
            raise PlainGradientError(
                f"parameter {name!r} received a plain-tensor gradient ({type(g).__name__}); its radius is unknown. "
                "Either a plain gradient was passed to backward() and reached this parameter unchanged (pass "
                "ballgrad.ball(g) instead, or call loss.backward() on the ball loss), or something computed it "
                "outside ballgrad (e.g. a custom autograd.Function working on .mid): please report it."
            )

    return hook


def ballify(module: nn.Module, rad: RadiusSpec = 0.0, *, buffers: bool = False) -> nn.Module:
    """Replace every parameter of ``module`` (in place) by an ``nn.Parameter`` holding a BallTensor.

    ``rad``: a float (same radius everywhere; 0 = exact points), a dict ``{name: radius}``, a tensor broadcastable to
    every parameter, or a callable ``(name, param) -> radius`` (or ``param -> radius``). With ``buffers=True``
    floating buffers (e.g. BatchNorm running statistics) become exact point balls too. Parameters that are already
    balls are left as they are. Returns ``module`` for chaining. A hook checks after every gradient accumulation that
    ``.grad`` is a BallTensor and raises ``PlainGradientError`` otherwise.
    """
    for mod_name, mod in module.named_modules():
        for p_name, p in list(mod.named_parameters(recurse=False)):
            full = f"{mod_name}.{p_name}" if mod_name else p_name
            if isinstance(p, BallTensor):
                continue
            if not p.is_floating_point():
                continue
            new = nn.Parameter(ball(p.detach().clone(), _radius_for(full, p, rad)), requires_grad=p.requires_grad)
            setattr(mod, p_name, new)
            if new.requires_grad:
                new.register_post_accumulate_grad_hook(_check_grad_is_ball(full))
        if buffers:
            for b_name, b in list(mod.named_buffers(recurse=False)):
                if b is not None and b.is_floating_point() and not isinstance(b, BallTensor):
                    mod.register_buffer(b_name, ball(b.detach().clone()), persistent=b_name not in mod._non_persistent_buffers_set)
    return module


def unballify(module: nn.Module) -> nn.Module:
    """Replace every ball parameter (and buffer) of ``module`` by a plain one holding its midpoint (in place)."""
    for mod in module.modules():
        for p_name, p in list(mod.named_parameters(recurse=False)):
            if isinstance(p, BallTensor):
                setattr(mod, p_name, nn.Parameter(p.mid.detach().clone(), requires_grad=p.requires_grad))
        for b_name, b in list(mod.named_buffers(recurse=False)):
            if isinstance(b, BallTensor):
                mod.register_buffer(b_name, b.mid.detach().clone(), persistent=b_name not in mod._non_persistent_buffers_set)
    return module


def is_ballified(module: nn.Module) -> bool:
    """True if every floating parameter of ``module`` is a BallTensor."""
    return all(isinstance(p, BallTensor) for p in module.parameters() if p.is_floating_point())
