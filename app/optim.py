"""``torch.optim.AdamW`` without the 1.4 s import of ``torch._dynamo`` it costs every training process.

torch 2.13 marks ``Optimizer.add_param_group``, ``zero_grad``, ``state_dict`` and ``load_state_dict`` with
``torch._disable_dynamo``, which imports ``torch._dynamo`` (and with it sympy and most of torch.fx) on the first
call, and wraps ``step`` in ``_use_grad_for_differentiable``, which imports it at every step to place graph breaks.
Both exist for ``torch.compile``; an eager optimizer only pays for them. Training processes start at every elastic
restart, so that import is 1.4-1.6 s of each recovery (README, "Elastic training under faults").

``AdamW`` here *is* ``torch.optim.AdamW``: each override calls the very function torch decorated (reached through
the ``__wrapped__`` that ``functools.wraps`` leaves on each decorator), so the arithmetic, the state layout and the
``state_dict`` format are torch's own, bit for bit, and the step hooks and profiler record that torch adds to every
optimizer class come back on this one. ``step`` runs under ``torch.no_grad()``, as the skipped decorator sets it for
a non-differentiable optimizer. Should a later torch drop ``__wrapped__``, a method falls back to torch's decorated
one: slower to start, never wrong (tests/unit/test_optim.py checks both the arithmetic and the import).
"""

from __future__ import annotations

import inspect

import torch
from torch.optim import Optimizer

_AdamW = torch.optim.AdamW


# The functions beneath torch's decorators: dynamo's, and (unwrap follows every __wrapped__) the profiling hook torch
# puts on an optimizer class's `step` at its first instance; Optimizer.__init__ puts that hook back on our `step`.
_add_param_group = inspect.unwrap(Optimizer.add_param_group)
_zero_grad = inspect.unwrap(Optimizer.zero_grad)
_state_dict = inspect.unwrap(Optimizer.state_dict)
_load_state_dict = inspect.unwrap(Optimizer.load_state_dict)
_step = inspect.unwrap(_AdamW.step)


class AdamW(_AdamW):
    """torch.optim.AdamW that never imports torch._dynamo (not for use under torch.compile or with
    differentiable=True, which need the graph breaks and the grad mode torch's decorators provide)."""

    def __init__(self, params, *args, **kwargs) -> None:
        if kwargs.get("differentiable"):
            raise ValueError("app.optim.AdamW does not support differentiable=True; use torch.optim.AdamW")
        super().__init__(params, *args, **kwargs)

    def add_param_group(self, param_group: dict) -> None:
        _add_param_group(self, param_group)

    def zero_grad(self, set_to_none: bool = True) -> None:
        _zero_grad(self, set_to_none)

    def state_dict(self) -> dict:
        return _state_dict(self)

    def load_state_dict(self, state_dict: dict) -> None:
        _load_state_dict(self, state_dict)

    @torch.no_grad()
    def step(self, closure=None):  # torch's step re-enables grad around the closure itself
        return _step(self, closure)
