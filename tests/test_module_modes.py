"""Entry points that run a user's model in eval mode for a moment (formats.
compress timing its layers, the tasks' metrics, scoring.evaluate, the
loader's chain check) gave every module the model's own mode afterwards
(``model.train(was)``): a BatchNorm the user froze in eval mode while the
rest trains was set training again, its running statistics then moved by
the next training step. Each module now gets back its own mode."""

from __future__ import annotations

import torch

from pointsparse import formats
from pointsparse import nn as spnn
from pointsparse.app import tasks


def _frozen_bn(model: torch.nn.Module) -> list:
    model.train()
    frozen = [m for m in model.modules() if isinstance(m, spnn.BatchNorm)][:1]
    for m in frozen:
        m.eval()
    return frozen


def _modes(model):
    return [m.training for m in model.modules()]


def test_compress_example_input_keeps_each_modules_mode():
    """(compress refuses a BatchNorm in training mode: every one is frozen here, the rest of the model training,
    which model.train(was) set training again.)"""
    model = tasks.sparse_model(0, width=8)
    model.train()
    frozen = [m for m in model.modules() if isinstance(m, spnn.BatchNorm)]
    for m in frozen:
        m.eval()
    before = _modes(model)
    x, _ = tasks.scene_tensor(0, points=800)
    formats.compress(model, "csr", example_input=x)
    assert _modes(model) == before and frozen and not any(m.training for m in frozen) and model.training


def test_the_scene_task_metric_keeps_each_modules_mode():
    task = tasks.scene_task(0, points=800, width=8)
    model = task.make_model(0)
    frozen = _frozen_bn(model)
    before = _modes(model)
    task.eval_fn(model)
    assert _modes(model) == before and not frozen[0].training


def test_the_loaders_chain_check_keeps_each_modules_mode():
    from pointsparse.models import MinkUNet
    from pointsparse.models.loading import shape_like

    model = MinkUNet(4, 5, cr=0.25)
    frozen = _frozen_bn(model)
    before = _modes(model)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    key = next(k for k in state if k.endswith("weight") and state[k].dim() == 3)  # a conv's (K, C_in, C_out)
    state[key] = state[key][:, :, : state[key].shape[2] // 2]  # narrowed: the chain check runs the model
    try:
        shape_like(model, state)
    except ValueError:
        pass  # (the narrowed width may not chain: the check ran the model either way)
    assert _modes(model) == before and not frozen[0].training
