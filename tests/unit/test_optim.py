"""app.optim.AdamW: torch's AdamW, bit for bit, without importing torch._dynamo."""

import copy
import json
import os
import subprocess
import sys

import pytest
import torch

from app.optim import AdamW

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(__file__)))


def _model(seed: int) -> torch.nn.Module:
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.GELU(), torch.nn.Linear(16, 4))


def _groups(model: torch.nn.Module) -> list[dict]:
    return [{"params": [p for p in model.parameters() if p.dim() >= 2], "weight_decay": 0.1},
            {"params": [p for p in model.parameters() if p.dim() < 2], "weight_decay": 0.0}]


def _train(make, steps: int = 6):
    model = _model(0)
    opt = make(_groups(model), lr=3e-3, betas=(0.9, 0.95), eps=1e-8)
    g = torch.Generator().manual_seed(1)
    for _ in range(steps):
        x = torch.randn(5, 8, generator=g)
        opt.zero_grad()
        model(x).square().mean().backward()
        opt.step()
    return model, opt


def test_updates_and_state_are_torchs_bit_for_bit():
    ours_model, ours = _train(AdamW)
    ref_model, ref = _train(torch.optim.AdamW)
    for a, b in zip(ours_model.parameters(), ref_model.parameters()):
        assert torch.equal(a, b)
    mine, theirs = ours.state_dict(), ref.state_dict()
    assert mine["param_groups"] == theirs["param_groups"]
    assert mine["state"].keys() == theirs["state"].keys()
    for k in mine["state"]:
        for name in ("step", "exp_avg", "exp_avg_sq"):
            assert torch.equal(mine["state"][k][name], theirs["state"][k][name])


def test_state_dicts_load_both_ways_and_training_continues_identically():
    """A checkpoint written by torch's AdamW resumes under ours (and back) to the same next step."""
    _, ref = _train(torch.optim.AdamW, steps=3)
    model_a, model_b = _model(0), _model(0)
    ours = AdamW(_groups(model_a), lr=3e-3, betas=(0.9, 0.95))
    theirs = torch.optim.AdamW(_groups(model_b), lr=3e-3, betas=(0.9, 0.95))
    # deep copies: load_state_dict keeps the given tensors, and two optimizers sharing them would step them twice
    ours.load_state_dict(copy.deepcopy(ref.state_dict()))
    theirs.load_state_dict(copy.deepcopy(ours.state_dict()))
    x = torch.randn(5, 8, generator=torch.Generator().manual_seed(2))
    for model, opt in ((model_a, ours), (model_b, theirs)):
        opt.zero_grad()
        model(x).square().mean().backward()
        opt.step()
    for a, b in zip(model_a.parameters(), model_b.parameters()):
        assert torch.equal(a, b)
    assert ours.state_dict()["state"][0]["step"].item() == 4


def test_step_hooks_run_once_and_step_needs_no_grad_context():
    """torch wraps an optimizer class's step in its hook runner at the first instance; app.optim imported after
    that must still reach the plain step (or every hook would run twice)."""
    import importlib

    import app.optim

    torch.optim.AdamW(_model(0).parameters())
    fresh = importlib.reload(app.optim)
    model = _model(0)
    opt = fresh.AdamW(model.parameters(), lr=1e-2)
    calls = []
    opt.register_step_post_hook(lambda *_: calls.append(1))
    model(torch.ones(1, 8)).sum().backward()
    opt.step()  # an in-place update of leaf parameters: fails unless the step runs without grad
    assert calls == [1]


def test_closure_runs_with_grad_and_differentiable_is_refused():
    model = _model(0)
    opt = AdamW(model.parameters(), lr=1e-2)

    def closure():
        opt.zero_grad()
        loss = model(torch.ones(2, 8)).sum()
        loss.backward()
        return loss

    assert torch.isfinite(opt.step(closure))
    with pytest.raises(ValueError, match="differentiable"):
        AdamW(model.parameters(), differentiable=True)


def test_a_fresh_interpreter_never_imports_dynamo():
    """The point of the class: construct, step, zero_grad, state_dict and load_state_dict without torch._dynamo
    (1.4 s of every training process's start). torch.optim.AdamW in the same script does import it."""
    script = """
import json, sys, torch
from app.optim import AdamW
m = torch.nn.Linear(4, 4)
opt = AdamW(m.parameters(), lr=1e-3)
m(torch.ones(1, 4)).sum().backward()
opt.step(); opt.zero_grad(); opt.load_state_dict(opt.state_dict())
ours = "torch._dynamo" in sys.modules
torch.optim.AdamW(m.parameters())
print(json.dumps({"ours": ours, "torch": "torch._dynamo" in sys.modules}))
"""
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True, timeout=120,
                         cwd=ROOT)
    assert json.loads(out.stdout.strip().splitlines()[-1]) == {"ours": False, "torch": True}
