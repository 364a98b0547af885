"""Models from a training checkpoint's config, dense or channel-pruned: the
config names the architecture (``model``, ``in_channels``, ``classes``,
``cr``, ``blocks``), for a pruned model the width of every layer
(``widths``, as :func:`pointsparse.prune.graph.widths` records them) and,
for a model with :class:`~pointsparse.nn.VoxelSkip` layers inserted, the
modules they wrap and their settings (``voxel_skip``, as
:func:`voxel_skips` records them) and, for one given
:class:`~pointsparse.nn.VoxelPrune` layers by :func:`add_voxel_prune`, the
modules whose input they prune and their settings (``voxel_prune``, as
:func:`voxel_prunes` records them).

A VoxelPrune inserted into a built model any other way (a forward hook of
the caller's own, a forward of its own) is not recorded: weights holding a
learned one's scorer are refused naming it, and a magnitude one holds no
tensor, so nothing in the weights shows it (the model loads unpruned)."""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path

import torch
from torch import nn

from .._modes import evaluating
from ..nn import Conv3d, VoxelPrune, VoxelSkip
from ..nn.modules import _Pointwise, hooked_voxel_prune, inner_voxel_prune
from ..tensor import SparseTensor, as_bool
from .minkunet import MinkUNet, ResidualBlock
from .spvcnn import SPVCNN


def build_model(config: dict) -> nn.Module:
    """An untrained model of the checkpoint config's architecture and widths."""
    if not isinstance(config, dict):
        raise TypeError(f"config must be a dict; got {type(config).__name__}")
    name = str(config.get("model", "minkunet")).lower()
    if name not in ("minkunet", "spvcnn"):
        raise ValueError(f"config model must be 'minkunet' or 'spvcnn'; got {config.get('model')!r}")
    missing = [key for key in ("in_channels", "classes", "cr", "blocks") if key not in config]
    if missing:
        raise ValueError(f"config lacks {', '.join(map(repr, missing))}")
    if not isinstance(config["classes"], (list, tuple)):
        raise TypeError(f"config classes must be a list of class names; got {type(config['classes']).__name__}")
    if config.get("widths") is not None and not isinstance(config["widths"], dict):
        raise TypeError(f"config widths must be a dict (group -> width); got {type(config['widths']).__name__}")
    cls = SPVCNN if name == "spvcnn" else MinkUNet
    model = cls(config["in_channels"], len(config["classes"]), cr=config["cr"], blocks=config["blocks"])
    if config.get("voxel_skip") is not None:  # (before the widths: they name the modules inside the skips)
        _add_recorded(model, config["voxel_skip"], "voxel_skip")
    # (after the skips: voxel_prunes names modules as the model with its skips has them; before the widths:
    # they name a learned scorer)
    if config.get("voxel_prune") is not None:
        _add_recorded(model, config["voxel_prune"], "voxel_prune")
    if config.get("widths"):
        from ..prune.graph import resize
        resize(model, config["widths"])
        _check_ends(model, "the config's widths give")
        _check_chain(model, "the config's widths")  # (a conv narrowed, its BatchNorm not: failed at a forward)
    return model


#: A VoxelSkip's settings as :func:`voxel_skips` records them (its arguments after ``module``), and a
#: VoxelPrune's as :func:`voxel_prunes` does.
_SETTINGS = ("keep_ratio", "score", "threshold", "in_channels")


def voxel_skips(model: nn.Module) -> dict[str, dict]:
    """``{module: {"keep_ratio", "score", "threshold", "in_channels"}}`` of
    every :class:`~pointsparse.nn.VoxelSkip` in ``model``, under the name of
    the module it wraps: what a checkpoint's config records
    (``voxel_skip``) so that :func:`build_model` wraps the same modules
    again, e.g. ``dict(config, voxel_skip=voxel_skips(model))``."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module; got {type(model).__name__}")
    return {name: _settings(m.prune) for name, m in model.named_modules() if isinstance(m, VoxelSkip)}


def _settings(prune: VoxelPrune) -> dict:
    """A VoxelPrune's (or a VoxelSkip's ``prune``'s) settings as a config records them (:data:`_SETTINGS`)."""
    return {"keep_ratio": prune.keep_ratio, "score": prune.score, "threshold": prune.threshold,
            "in_channels": None if prune.scorer is None else prune.scorer.in_features}


def _named_module(model: nn.Module, module_name, example: str) -> nn.Module:
    """``model``'s submodule ``module_name`` (not the model itself):
    TypeError naming ``model`` or ``module_name`` (``example``: a name to
    show) where either is of the wrong kind, ValueError where the model has
    no such submodule."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module; got {type(model).__name__}")
    if not isinstance(module_name, str):
        raise TypeError(f"module_name must be a str (a submodule's name, e.g. {example!r}); got "
                        f"{type(module_name).__name__}")
    module = _submodule(model, module_name) if module_name else None
    if module is None:
        raise ValueError(f"module_name {module_name!r} names no submodule of the model")
    return module


def _never_called(model: nn.Module, module: nn.Module) -> str | None:
    """Why ``model`` never calls its submodule ``module`` (a container it
    indexes or iterates: an ``nn.ModuleList`` / ``nn.ModuleDict``, whose
    call is no forward; SPVCNN's ``unet``, whose stages SPVCNN runs one by
    one; SPVCNN's ``unet.classifier``, an ``nn.Identity`` in place of the
    U-Net's, whose classifier runs on the points), or None."""
    if isinstance(module, (nn.ModuleList, nn.ModuleDict)):
        return f"an nn.{type(module).__name__}, a container the model indexes or iterates and never calls"
    if isinstance(model, SPVCNN) and module is model.unet:
        return "SPVCNN's voxel branch, whose stages SPVCNN runs one by one: it never calls unet itself"
    if isinstance(model, SPVCNN) and module is model.unet.classifier:
        return ("the nn.Identity SPVCNN puts in place of its U-Net's classifier and never calls (the classifier "
                "that runs is 'classifier', on the points)")
    return None


def _ancestors(model: nn.Module, module_name: str):
    """``(name, module, part)`` of each module above the submodule
    ``module_name`` of ``model``, outermost first (``""``: the model
    itself), ``part`` the next part of ``module_name`` below it."""
    parts = module_name.split(".")
    for i in range(len(parts)):
        name = ".".join(parts[:i])
        yield name, model.get_submodule(name), parts[i]


def _feats_holder(model: nn.Module, module_name: str) -> str | None:
    """The name of the outermost layer above ``module_name`` in ``model``
    (``""``: the model itself) that runs its children on its feats, a plain
    tensor (a pointsparse.nn pointwise layer's ``fn``: ``Linear``,
    ``ReLU``...; a VoxelPrune's ``scorer``), or None."""
    return next((name for name, module, _ in _ancestors(model, module_name)
                 if isinstance(module, (_Pointwise, VoxelPrune))), None)


def _check_runs_voxels(model: nn.Module, module_name: str, module: nn.Module, uncalled: str, point: str) -> None:
    """A ValueError naming ``module_name`` where ``model`` never calls
    ``module`` (:func:`_never_called`; ``uncalled`` then says what to do) or
    it is in SPVCNN's point branch, on (N, C) tensors (``point`` then says
    what to do), is a VoxelPrune (a second selection on its own), or inside a layer that runs it on its feats, a plain
    tensor (:func:`_feats_holder`): add_voxel_skip's and add_voxel_prune's
    refusal."""
    why = _never_called(model, module)
    if why:
        raise ValueError(f"module_name {module_name!r} is {why}: {uncalled}")
    if isinstance(module, VoxelPrune):
        raise ValueError(f"module_name {module_name!r} is a VoxelPrune, which selects voxels itself (a VoxelPrune on "
                         "its input would prune twice, a VoxelSkip's never run; a VoxelSkip around it would get "
                         "fewer sites than it keeps): change its keep_ratio or threshold instead")
    holder = _feats_holder(model, module_name)
    if holder is not None:
        kind = type(model.get_submodule(holder)).__name__
        where, fix = (f"{holder!r}", f"name {holder!r} itself") if holder else ("the model", "give the model it is in")
        raise ValueError(f"module_name {module_name!r} is inside {where} (a pointsparse.nn {kind}), which runs it "
                         f"on the feats, a plain (N, C) tensor, not on a SparseTensor: {fix}")
    if isinstance(model, SPVCNN) and not module_name.startswith("unet."):
        raise ValueError(f"module_name {module_name!r} is in SPVCNN's point branch, which runs on (N, C) point "
                         f"features, not on a SparseTensor: {point}")


def _in_skip_branch(model: nn.Module, module_name: str) -> str | None:
    """The name of the innermost VoxelSkip of ``model`` whose branch (its
    ``module``) holds the submodule ``module_name`` (``""``: the model
    itself), or None."""
    found = None
    for name, module, part in _ancestors(model, module_name):
        if isinstance(module, VoxelSkip) and part == "module":
            found = name
    return found


def _meets_unpruned_sites(model: nn.Module, module_name: str) -> str | None:
    """Why a VoxelPrune on the input of ``model``'s submodule
    ``module_name`` would make every forward fail, as its output meets
    sites that were not pruned (a ValueError in the sum or the ``cat``), or
    None: a module inside a :class:`~pointsparse.models.ResidualBlock`'s
    ``main`` or ``shortcut`` (the other branch keeps the block's input's
    sites), or, in a MinkUNet (the model, SPVCNN's ``unet``, one a wrapper
    holds), a module whose input is
    an encoder stage's output (``down.<i>``, its strided ConvBlock and
    conv: that output is also the decoder's skip) or the output of an
    ``up.<i>`` transposed conv (``up.<i>.1`` on: it meets the skip in the
    ``cat``)."""
    prefix = None  # (the innermost MinkUNet holding the module: the model, SPVCNN's unet, one a wrapper holds)
    for name, module, part in _ancestors(model, module_name):
        if isinstance(module, ResidualBlock) and part in ("main", "shortcut"):
            other = "shortcut" if part == "main" else "main branch"
            block = f"the ResidualBlock {name!r}" if name else "the ResidualBlock the model is"
            fix = f"the input of {name!r} itself" if name else "the model's input"
            return (f"inside the {part} of {block}, whose sum with its {other} needs the sites of the block's "
                    f"input: prune {fix}")
        if isinstance(module, MinkUNet):
            prefix = f"{name}." if name else ""
    if prefix is None:
        return None
    parts = module_name[len(prefix):].split(".")
    if len(parts) >= 2 and parts[0] == "down" and all(p == "0" for p in parts[2:]):
        return (f"fed the output of the stage before {prefix}down.{parts[1]}, which is also the decoder's skip: the "
                f"cat would meet the unpruned sites; prune the input of {prefix}down.{parts[1]}.1 (its first "
                "residual block, at the new stride) or of a module of the stem or a fuse stage")
    if len(parts) >= 3 and parts[0] == "up" and parts[2] != "0":
        return (f"fed the output of the transposed conv {prefix}up.{parts[1]}.0, which the cat then joins to the "
                f"skip's unpruned sites; prune the input of {prefix}up.{parts[1]} (or of a module of "
                f"{prefix}fuse.{parts[1]})")
    return None


def _as_model_is(prune: VoxelPrune, module: nn.Module, model: nn.Module) -> None:
    """``prune`` (a learned score's scorer) moved to the device and dtype of
    ``module``'s weights, or ``model``'s where the module has none (a ReLU)."""
    like = next((p for m in (module, model) for p in m.parameters() if p.is_floating_point()), None)
    if like is not None:
        prune.to(like.device, like.dtype)


def add_voxel_skip(model: nn.Module, module_name: str, keep_ratio: float = 0.5, score: str = "magnitude",
                   in_channels: int | None = None, threshold: float | None = None) -> VoxelSkip:
    """Replaces ``model``'s submodule ``module_name`` by a
    :class:`~pointsparse.nn.VoxelSkip` of these settings around it (its
    keys move under ``module.``; ``load_state_dict`` still takes the
    unwrapped ones) and returns it; :func:`voxel_skips` records it for a
    checkpoint's config. A name the model lacks, the model itself, a module
    it never calls (an ``nn.ModuleList`` / ``nn.ModuleDict``, SPVCNN's
    ``unet`` and ``unet.classifier``), one of SPVCNN's point branch or one
    inside a layer that runs it on its feats (a pointsparse.nn pointwise
    layer's ``fn``, a learned VoxelPrune's ``scorer``): no SparseTensor
    there) is refused, and so is a VoxelPrune (its selection is no
    submanifold branch), a module holding a VoxelPrune layer (the branch
    would give fewer sites than the VoxelSkip keeps; a VoxelSkip inside is
    no matter) and a module holding one of :func:`add_voxel_prune`
    (on it or inside it: add the VoxelSkips first, as :func:`build_model`
    does)."""
    module = _named_module(model, module_name, "fuse.0.0.main")
    _check_runs_voxels(model, module_name, module,
                       "the model cannot run it wrapped in a VoxelSkip; wrap a module it calls (e.g. "
                       "'fuse.0.0.main', 'unet.fuse.3.0.main')",
                       "a VoxelSkip wraps a module of its voxel branch (unet.*, e.g. 'unet.fuse.3.0.main')")
    inner = inner_voxel_prune(module, module_name)
    if inner is not None:
        raise ValueError(f"module_name {module_name!r} holds a VoxelPrune at {inner!r}: wrapped, the branch would "
                         "give fewer sites than the VoxelSkip keeps, and every forward would fail; give the "
                         "VoxelSkip's keep_ratio or threshold instead, or wrap a module without it")
    hooked = hooked_voxel_prune(module, module_name)
    if hooked is not None:
        raise ValueError(f"module_name {module_name!r} holds the VoxelPrune add_voxel_prune put on {hooked!r}: "
                         "wrapped, the branch would give fewer sites than the VoxelSkip keeps, and voxel_prunes "
                         "could not record the pruner under its new name; wrap modules in VoxelSkip before adding "
                         "VoxelPrune")
    skip = VoxelSkip(module, keep_ratio, score, in_channels, threshold)
    _as_model_is(skip.prune, module, model)  # (a learned score's scorer: float32 on a float64 model failed its forward)
    parent, _, leaf = module_name.rpartition(".")
    setattr(model.get_submodule(parent), leaf, skip)
    return skip


def _add_recorded(model: nn.Module, recorded, key: str) -> None:
    """Adds to ``model`` the layers its config's ``key`` records (module ->
    settings: ``voxel_skip`` by :func:`add_voxel_skip`, in order, a skip
    inside another's module named as it is once the outer one wraps it;
    ``voxel_prune`` by :func:`add_voxel_prune`); TypeError / ValueError
    naming the entry (``config key['name']``; the model, :func:`build_model`'s,
    is then dropped)."""
    add, layer = (add_voxel_skip, "VoxelSkip") if key == "voxel_skip" else (add_voxel_prune, "VoxelPrune")
    if not isinstance(recorded, dict):
        raise TypeError(f"config {key} must be a dict (module -> settings); got {type(recorded).__name__}")
    for name, settings in recorded.items():
        if not (isinstance(name, str) and name and _submodule(model, name) is not None):
            raise ValueError(f"config {key} names {name!r}, which the model does not have")
        where = f"config {key}[{name!r}]"
        if not isinstance(settings, dict):
            raise TypeError(f"{where} must be a dict of {layer}'s settings; got {type(settings).__name__}")
        other = [k for k in settings if k not in _SETTINGS]
        if other:
            raise ValueError(f"{where} has {other[0]!r}; its settings are {', '.join(_SETTINGS)}")
        try:
            add(model, name, **settings)
        except (TypeError, ValueError) as error:
            raise type(error)(f"{where}: {error}") from None


#: The child of a model that holds the VoxelPrune layers :func:`add_voxel_prune` adds.
_PRUNES = "voxel_prune"


class _PruneInput:
    """The forward pre-hook :func:`add_voxel_prune` registers: the VoxelPrune
    the model's ``voxel_prune`` holds under ``key`` (``prunes``) on the
    module's first argument (an object, not a closure, so that a deepcopy of
    the model runs the copy's, and the model pickles). It looks the pruner
    up at each call: one the caller put in its place is the one that runs
    (the old one ran, silently, while the model showed the new one)."""

    def __init__(self, prune: VoxelPrune, name: str, prunes: nn.ModuleDict | None = None,
                 key: str | None = None) -> None:
        self.prune, self.name, self.prunes, self.key = prune, name, prunes, key

    def current(self) -> VoxelPrune:
        """The VoxelPrune this hook runs: the one registered under its key
        (``prune``, the one it was made with, for a hook pickled before it
        kept the key); ValueError where that was deleted or is no VoxelPrune."""
        prunes = getattr(self, "prunes", None)
        if prunes is None:
            return self.prune
        prune = prunes._modules.get(self.key)
        if not isinstance(prune, VoxelPrune):
            why = "deleted" if prune is None else f"replaced by a {type(prune).__name__}, not a VoxelPrune"
            raise ValueError(f"the hook add_voxel_prune put on {self.name!r} runs {_PRUNES}.{self.key}, which was "
                             f"{why} since: put a VoxelPrune back there, or remove the hook (the module's "
                             "_forward_pre_hooks)")
        return prune

    def __call__(self, module: nn.Module, args: tuple):
        if not args or not isinstance(args[0], SparseTensor):
            got = type(args[0]).__name__ if args else "no positional argument"
            raise TypeError(f"the VoxelPrune add_voxel_prune put on {self.name!r} takes a SparseTensor (the "
                            f"module's first argument); got {got}")
        return (self.current()(args[0]),) + tuple(args[1:])


def _prune_key(name: str) -> str:
    """The key in the model's ``voxel_prune`` of the VoxelPrune on module ``name``."""
    return name.replace(".", "_")


def add_voxel_prune(model: nn.Module, module_name: str, keep_ratio: float = 0.5, score: str = "magnitude",
                    in_channels: int | None = None, threshold: float | None = None) -> VoxelPrune:
    """A :class:`~pointsparse.nn.VoxelPrune` of these settings on the input
    of ``model``'s submodule ``module_name`` (a forward pre-hook on it: its
    first argument, a SparseTensor, pruned), registered on ``model`` as
    ``voxel_prune.<module_name with dots as _>`` (a learned score's scorer
    trains, is saved in the state_dict and moves with the model; the other
    keys are unchanged, so the unpruned model's weights still load) and put
    on the device and dtype of the module's parameters; returned.
    :func:`voxel_prunes` records it for a checkpoint's config. It runs
    where the module is called (``module(x)``), a TypeError there where the
    first argument is no SparseTensor; the hook runs the VoxelPrune
    registered under that key at the call (one put in its place runs). A module given one already, a
    VoxelPrune (its own ``keep_ratio`` / ``threshold`` is the one to change:
    a second one on its input pruned twice), a VoxelSkip (a ResidualBlock runs its ``add_to``, which no hook sees), a
    module inside a VoxelSkip's branch (its ``module``, which must give back
    every site the VoxelSkip keeps: every forward failed) or
    a name the model lacks is refused, and so is a module whose pruned
    output would meet unpruned sites (every forward failed): one inside a
    ResidualBlock's ``main`` or ``shortcut``, and in a MinkUNet (SPVCNN's
    ``unet``) a strided stage's ``down.<i>`` / ``down.<i>.0`` (its input is
    the decoder's skip too) and an ``up.<i>`` past its transposed conv
    (its output meets the skip in the cat); wrap modules in VoxelSkip first (a
    module moved after would be recorded under a name its key no longer
    matches: :func:`voxel_prunes` refuses it). An ``nn.Sequential`` model is
    refused (it would run the registered pruners as a layer), and so is a
    module the model never calls (an ``nn.ModuleList`` / ``nn.ModuleDict``,
    SPVCNN's ``unet`` and ``unet.classifier``), on which the pruner would
    never run, and a module of SPVCNN's point branch or one inside a layer
    that runs it on its feats (a pointsparse.nn pointwise layer's ``fn``, a
    learned VoxelPrune's ``scorer``): no SparseTensor there, every forward
    failed."""
    if isinstance(model, nn.Sequential):  # (its forward calls every child: the pruners' ModuleDict too)
        raise ValueError(f"model is an nn.Sequential, which would run the pruners add_voxel_prune registers on it "
                         f"(its child {_PRUNES!r}) as a layer; wrap it in a module whose forward calls it, and give "
                         "that one")
    module = _named_module(model, module_name, "fuse.0")
    _check_runs_voxels(model, module_name, module,
                       "a VoxelPrune on its input would never run; name a module the model calls (e.g. 'fuse.0', "
                       "'unet.fuse.3')",
                       "a VoxelPrune prunes the input of a module of its voxel branch (unet.*, e.g. 'unet.fuse.3')")
    skip = _in_skip_branch(model, module_name)
    if skip is not None:
        where, around = (f"the VoxelSkip {skip!r}", f" (e.g. {skip.rpartition('.')[0]!r})") if skip else \
            ("the VoxelSkip the model is", "")
        raise ValueError(f"module_name {module_name!r} is inside the branch of {where}, which must give back every "
                         "site it keeps: a VoxelPrune there leaves the branch fewer sites than it keeps, and every "
                         f"forward would fail; prune the input of a module around the VoxelSkip{around}, or change "
                         "the VoxelSkip's keep_ratio or threshold")
    if isinstance(module, VoxelSkip):
        raise ValueError(f"module_name {module_name!r} is a VoxelSkip, which its callers may run by add_to (a "
                         "ResidualBlock does), past any forward hook: prune the input of the module holding it")
    meets = _meets_unpruned_sites(model, module_name)
    if meets is not None:
        raise ValueError(f"module_name {module_name!r} is {meets}; a VoxelPrune there would make every forward "
                         "fail")
    if any(isinstance(h, _PruneInput) for h in module._forward_pre_hooks.values()):
        raise ValueError(f"{module_name!r} has a VoxelPrune already (add_voxel_prune)")
    prunes = model._modules.get(_PRUNES)
    if prunes is None and hasattr(model, _PRUNES):
        raise ValueError(f"model has an attribute {_PRUNES!r} of its own; add_voxel_prune keeps its layers there")
    key = _prune_key(module_name)
    if prunes is not None and (not isinstance(prunes, nn.ModuleDict) or key in prunes):
        raise ValueError(f"model's {_PRUNES} holds {key!r} already, which add_voxel_prune would give to "
                         f"{module_name!r}")
    prune = VoxelPrune(keep_ratio, score, in_channels, threshold)
    _as_model_is(prune, module, model)
    if prunes is None:
        prunes = nn.ModuleDict()
        model.add_module(_PRUNES, prunes)
    prunes[key] = prune
    module.register_forward_pre_hook(_PruneInput(prune, module_name, prunes, key))
    return prune


def voxel_prunes(model: nn.Module) -> dict[str, dict]:
    """``{module: {"keep_ratio", "score", "threshold", "in_channels"}}`` of
    every VoxelPrune :func:`add_voxel_prune` put on ``model``, under the name
    of the module whose input it prunes: what a checkpoint's config records
    (``voxel_prune``) so that :func:`build_model` adds them again, e.g.
    ``dict(config, voxel_prune=voxel_prunes(model))``. ValueError for one it
    cannot record: a pruner whose module was moved since (wrapped in a
    VoxelSkip: its key would name another place), one no module runs, one
    registered on another model."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module; got {type(model).__name__}")
    prunes = model._modules.get(_PRUNES)
    held = {id(p): key for key, p in prunes.items()} if isinstance(prunes, nn.ModuleDict) else {}
    out, found = {}, set()
    for name, m in model.named_modules():
        for hook in m._forward_pre_hooks.values():
            if not isinstance(hook, _PruneInput):
                continue
            prune = hook.current()
            key = held.get(id(prune))
            if key is None:
                raise ValueError(f"the VoxelPrune on {name!r} is registered on another model than the one given "
                                 "(add_voxel_prune was given a module holding this one)")
            if key != _prune_key(name):
                raise ValueError(f"{_PRUNES}.{key} runs on {name!r}: the model changed around it after "
                                 "add_voxel_prune, and a config recording it would add it as another key; wrap "
                                 "modules in VoxelSkip before adding VoxelPrune")
            found.add(key)
            out[name] = _settings(prune)
    idle = [key for key in held.values() if key not in found]
    if idle:
        raise ValueError(f"{_PRUNES}.{idle[0]} runs on no module of the model (its hook was removed)")
    return out


def load_model(path, map_location="cpu", *, allow_non_finite: bool = False) -> nn.Module:
    """The model of a checkpoint written by ``pointsparse train`` or
    ``pointsparse prune channels`` (loaded with ``weights_only=True``), with
    its weights, in eval mode. ``map_location``: the device to put it on
    (a ``torch.device``, a string such as ``"cuda:0"``, a device index),
    or None for the CPU it is read onto. Weights that hold NaN or inf are a
    ValueError naming the file and the tensor, as the commands refuse them
    (:func:`model_from_state`); ``allow_non_finite=True`` loads them as they
    are (to inspect them)."""
    from .. import checkpoint

    allow_non_finite = as_bool(allow_non_finite, "allow_non_finite")
    if not isinstance(path, (str, os.PathLike)):
        raise TypeError(f"path must be the checkpoint file's path (a str or Path); got {type(path).__name__}")
    # (torch.load's other forms, a dict or a function of storages, do not apply: the file is read onto the CPU)
    if map_location is not None and not isinstance(map_location, torch.device):
        if isinstance(map_location, bool) or not isinstance(map_location, (str, int)):
            raise TypeError("map_location must be a device (a torch.device, a string such as 'cpu' or 'cuda:0', a "
                            f"device index) or None; got {type(map_location).__name__}")
        try:
            map_location = torch.device(map_location)
        except (RuntimeError, ValueError, OverflowError) as error:  # (an index past a C long: ValueError)
            if isinstance(map_location, int) and 0 <= map_location < 2**63:  # (an index, but no accelerator here)
                raise ValueError(f"map_location {map_location} (a device index) is not possible here: "
                                 f"{error}") from None
            raise ValueError(f"map_location {map_location!r} is no device (e.g. 'cpu', 'cuda', 'cuda:0')") from None
    state = checkpoint.load_training(Path(path))  # data only (weights_only=True), digest checked
    try:
        model = model_from_state(state, allow_non_finite=allow_non_finite)
    except (ValueError, TypeError) as error:
        raise (TypeError if isinstance(error, TypeError) else ValueError)(f"checkpoint {path}: {error}") from error
    try:
        model = model.to(map_location)
    except (AssertionError, RuntimeError) as error:  # e.g. "Torch not compiled with CUDA enabled"
        raise ValueError(f"map_location {str(map_location)!r} is not possible here: {error}") from None
    _apply_masks(model)  # (each masked weight, a plain attribute .to() does not move, made where the model is now)
    return model.eval()


def model_from_state(state: dict, *, allow_non_finite: bool = False) -> nn.Module:
    """The model of a training checkpoint's contents (``state["config"]``
    builds it, ``state["model"]`` holds its weights), dense or channel-pruned
    (the widths in the config, or only in the weights' shapes), with the
    VoxelSkip and VoxelPrune layers its config records (``voxel_skip``,
    ``voxel_prune``) and the biases and pruning masks the weights carry; in
    the mode it was built in. A weight or statistic that holds NaN or inf (a
    diverged run's, a damaged file's: the model would run, every output NaN;
    training refuses to write them), or a running variance below zero, is a
    ValueError naming it, unless ``allow_non_finite``."""
    allow_non_finite = as_bool(allow_non_finite, "allow_non_finite")
    if not isinstance(state, dict) or not isinstance(state.get("config"), dict) or not isinstance(
            state.get("model"), dict):
        raise ValueError("a training checkpoint holds a dict with a 'config' dict and a 'model' dict (a state_dict)")
    model = build_model(state["config"])
    weights = state["model"]
    shape_like(model, weights)
    try:
        model.load_state_dict(weights)
    except RuntimeError as error:  # missing, unexpected or misshapen tensors
        raise ValueError(f"the weights do not fit the model its config builds: {_misfit(model, weights, error)}") \
            from error
    _apply_masks(model)
    name = None if allow_non_finite else non_finite_weight(model)
    if name is not None:
        raise ValueError(f"{name} holds NaN or inf: the weights of a diverged run or a damaged file; retrain (or "
                         "resume from an earlier checkpoint), or load it with pointsparse.models.load_model(path, "
                         "allow_non_finite=True) to inspect it")
    name = None if allow_non_finite else negative_variance_entry(model.state_dict())
    if name is not None:  # (every output NaN, and predict wrote class 0 for every point)
        raise ValueError(f"{name} holds negative values, but a running variance is >= 0: a damaged file; load it "
                         "with pointsparse.models.load_model(path, allow_non_finite=True) to inspect it")
    return model


def negative_variance_entry(state: dict) -> str | None:
    """The name of the first running variance (a ``*running_var`` entry of
    the ``state_dict`` ``state``: a BatchNorm's, an InstanceNorm's) holding a
    value below zero, or None. Such a normalisation divides by the square
    root of a negative number: every output NaN, silently."""
    for name, value in state.items():
        if name.rsplit(".", 1)[-1] == "running_var" and isinstance(value, torch.Tensor) and \
                value.is_floating_point() and bool((value < 0).any()):
            return name
    return None


def non_finite_weight(model: nn.Module) -> str | None:
    """The name of the first entry of ``model``'s state whose float values
    hold NaN or inf, or None (:func:`non_finite_entry`)."""
    return non_finite_entry(model.state_dict())


def non_finite_entry(state: dict) -> str | None:
    """The name of the first entry of the ``state_dict`` ``state`` whose
    float values hold NaN or inf, or None: tensors, and the tensors inside
    an entry that is data (a compressed layer's ``_extra_state``, its
    formats as dicts and lists: it raised AttributeError on those)."""
    for name, value in state.items():
        if not _finite(value):
            return name
    return None


def _finite(value) -> bool:
    """Whether every float tensor in ``value`` (a tensor, or dicts, lists and
    tuples of them and of plain values) is finite."""
    if isinstance(value, torch.Tensor):
        return not value.is_floating_point() or bool(torch.isfinite(value).all())
    if isinstance(value, dict):
        return all(_finite(v) for v in value.values())
    if isinstance(value, (list, tuple)):
        return all(_finite(v) for v in value)
    return True


def _misfit(model: nn.Module, weights: dict, error: RuntimeError) -> str:
    """Why ``weights`` do not load into ``model``: a fused inference model's
    (whole BatchNorms missing, every tensor of each, and nothing else;
    weights that keep some BatchNorms whole, an SPVCNN's fused before its
    point MLPs' BatchNorm1d were folded too, alike) said so; a wrapper's (every key
    prefixed ``module.`` or ``_orig_mod.``) said so; else the keys missing and
    unexpected, the first few of each (torch's message lists every one), or
    torch's message."""
    own = model.state_dict()
    missing = [k for k in own if k not in weights]
    unexpected = [k for k in weights if k not in own]
    bns = {k.rpartition(".")[0] for k in own if k.endswith(".running_mean")}
    kept = {k.rpartition(".")[0] for k in weights}
    folded = {k.rpartition(".")[0] for k in missing} & bns
    if missing and not folded & kept and all(k.rpartition(".")[0] in folded for k in missing):
        return ("they are a fused inference model's (nn.fuse_for_inference folds each BatchNorm into its conv, "
                f"and the model has {len(folded)} BatchNorms): save the trained model's state_dict, and fuse the "
                "model load_model returns")
    if not missing and not unexpected:
        return str(error)
    skips = _unrecorded_voxel_skips(model, unexpected, set(missing))
    if skips:
        return (f"they hold VoxelSkip layers the config does not record ({', '.join(skips)}): save a model with "
                "VoxelSkip inserted with its config's voxel_skip (dict(config, voxel_skip="
                "pointsparse.models.voxel_skips(model))), from which load_model wraps them again")
    scorers = [k[:-len(".scorer.weight")] for k in unexpected
               if k.endswith(".scorer.weight") and weights[k].dim() == 2 and weights[k].shape[0] == 1]
    if scorers:
        return (f"they hold a learned VoxelPrune's scorer ({', '.join(scorers)}): save a model given VoxelPrune by "
                "pointsparse.models.add_voxel_prune with its config's voxel_prune (dict(config, voxel_prune="
                "pointsparse.models.voxel_prunes(model))), from which load_model adds them again; one inserted "
                "another way (a forward hook, a forward of its own) is no part of a config: build the model, "
                "insert it the same way, then load_state_dict these weights")

    gone = set(missing)
    kernels = [k for k in unexpected if k.rpartition(".")[2] == "kernel" and
               {k.rpartition(".")[0] + ".weight", k.rpartition(".")[0] + ".weight_orig"} & gone and
               isinstance(model.get_submodule(k.rpartition(".")[0]), Conv3d)]
    if kernels:
        return (f"{len(kernels)} tensors named 'kernel' ({_few(kernels)}) in place of a Conv3d's 'weight': a "
                "MinkowskiEngine or TorchSparse model's, whose offsets are in another order; convert each: "
                "state[name + '.weight'] = pointsparse.nn.weight_from(state.pop(name + '.kernel'), kernel_size, "
                "'minkowski' (or 'torchsparse'))")

    for prefix, who in (("module.", "DistributedDataParallel's or DataParallel's"),
                        ("_orig_mod.", "a torch.compile'd model's")):
        if unexpected and all(k.startswith(prefix) for k in unexpected) and \
                {k[len(prefix):] for k in unexpected} >= set(missing):
            return (f"every key starts with {prefix!r} ({who} wrapper): save the model inside it (ddp.module, "
                    f"compiled._orig_mod), or strip the prefix: {{k.removeprefix({prefix!r}): v for k, v in "
                    "state.items()}")

    parts = [f"{len(missing)} missing ({_few(missing)})"] if missing else []
    parts += [f"{len(unexpected)} unexpected ({_few(unexpected)})"] if unexpected else []
    return "tensors " + "; ".join(parts)


def _few(keys: list[str]) -> str:
    """The first five of ``keys``, and how many more."""
    return ", ".join(keys[:5]) + (f" and {len(keys) - 5} more" if len(keys) > 5 else "")


def _unrecorded_voxel_skips(model: nn.Module, unexpected: list[str], missing: set[str]) -> list[str]:
    """The modules of ``model`` that the ``unexpected`` keys show wrapped in a
    VoxelSkip: ``name.module.key`` for a ``name.key`` that is ``missing``,
    or ``name.prune.scorer.*`` (a learned score) for a module ``name``."""
    found = []
    for key in unexpected:
        for marker in (".module.", ".prune.scorer."):
            name, _, rest = key.partition(marker)
            if rest and (name + "." + rest in missing if marker == ".module." else
                         _submodule(model, name) is not None):
                if name not in found:
                    found.append(name)
                break
    return found


def _apply_masks(model: nn.Module) -> None:
    """Recompute every masked tensor (``weight = weight_orig * weight_mask``)
    from the loaded ``_orig`` and ``_mask``: ``torch.nn.utils.prune`` does it
    in a forward pre-hook, so until the first forward ``module.weight`` would
    still hold what it was before the load (the full mask's ``weight_orig``).
    Without autograd: a product autograd made is no graph leaf, which
    ``copy.deepcopy`` of the loaded model refuses (the hook makes it again,
    with its gradient, at each forward). Each masked module is kept
    copyable after its forwards as the toolkit's own methods leave the
    modules they prune (``prune._copyable.keep_copyable``): the model saved
    deep-copied after a training forward, and its loaded twin, whose masks
    torch's hooks carry, refused it."""
    from ..prune import BasePruningMethod
    from ..prune._copyable import keep_copyable
    with torch.no_grad():
        for module in model.modules():
            hooks = [h for h in module._forward_pre_hooks.values() if isinstance(h, BasePruningMethod)]
            for hook in hooks:
                hook(module, None)
            if hooks:
                keep_copyable(module)


def shape_like(model: nn.Module, state_dict: dict) -> None:
    """Give ``model`` (as :func:`build_model` makes it) what ``state_dict``
    holds beyond its config: biases folded in, pruning masks (``name_orig``
    + ``name_mask``, as ``torch.nn.utils.prune`` stores them) and narrower
    tensors, so that ``model.load_state_dict(state_dict)`` then loads. The
    trainer calls it before it makes the optimizer of a resumed run. A
    complex tensor for a real one of the model is a ValueError naming it
    (``load_state_dict`` drops the imaginary part with a warning)."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module; got {type(model).__name__}")
    if not isinstance(state_dict, Mapping):
        raise TypeError(f"state_dict must be a dict of names to tensors (a model's state_dict()); got "
                        f"{type(state_dict).__name__}")
    own = dict(model.named_parameters())
    own.update(model.named_buffers())
    for key, value in state_dict.items():  # (else an AttributeError from the fitting below)
        if isinstance(key, str) and key.rpartition(".")[2] == "_extra_state" and isinstance(value, dict) and \
                ("offsets" in value or "weight_format" in value):  # (SparseConv3d's, SparseLinear's)
            raise ValueError(f"the weights are a compressed model's (formats.compress): {key!r} holds a sparse "
                             "format, and the config builds the uncompressed model; save the uncompressed "
                             "model's state_dict, and compress the model load_model returns (or load these "
                             "weights into a model compressed the same way: load_state_dict)")
        if not isinstance(key, str):
            raise ValueError(f"the weights must map names to tensors (a state_dict); key {key!r} of type "
                             f"{type(key).__name__} is not a name (str)")
        if not isinstance(value, torch.Tensor):
            raise ValueError(f"the weights must map names to tensors (a state_dict); {key!r} holds "
                             f"{type(value).__name__}")
        if value.is_meta:  # (else torch's "Cannot copy out of meta tensor; no data!", once per tensor)
            raise ValueError(f"the weights' {key!r} is a tensor on the meta device (a shape, no values): these are "
                             "the weights of a model never materialised")
        built = _built_tensor(own, key)
        if value.is_complex() and built is not None and not built.is_complex():  # (else torch's warning alone)
            raise ValueError(f"the weights' {key!r} is {value.dtype} where the model's is {built.dtype}: loading it "
                             "would drop the imaginary part; give real weights (these are no weights of this model)")
    for key, value in state_dict.items():  # (else torch's broadcasting error from the mask's product)
        mask = state_dict.get(key[:-5] + "_mask") if key.endswith("_orig") else None
        if isinstance(mask, torch.Tensor) and mask.shape != value.shape:
            raise ValueError(f"the weights' {key[:-5] + '_mask'!r} has shape {tuple(mask.shape)} but {key!r}, the "
                             f"tensor it masks, {tuple(value.shape)}: a pruning mask is of its tensor's shape")
    _bias_like(model, state_dict)
    _mask_like(model, state_dict)
    narrowed = _fit_shapes(model, state_dict)
    _check_ends(model, "the weights give")
    if narrowed:
        _apply_masks(model)  # (a masked weight narrowed: the one its hook computed is as wide as built)
        _check_chain(model)


def _built_tensor(own: dict, key: str) -> torch.Tensor | None:
    """The model's tensor (of ``own``, its parameters and buffers by name)
    that the stored ``key`` loads into: ``key``'s own, or, for a masked
    tensor (``name_orig``, ``name_mask``) where the model has no mask yet,
    the tensor ``name``; None where the model has none (an unexpected key)."""
    if key in own:
        return own[key]
    if key.endswith(("_orig", "_mask")):
        return own.get(key[:-5])
    return None


def _check_chain(model: nn.Module, what: str = "the weights' channel widths") -> None:
    """ValueError naming the first layer of a MinkUNet / SPVCNN whose input
    is not as wide as it was fitted to take (a conv narrowed but not its
    BatchNorm or the next layer's input: weights no channel pruning gives,
    which load and then fail at the first forward), found by one forward of
    eight voxels (values unused: the fitted tensors need not be loaded yet);
    the model's mode is restored. ``what``: whose widths the error names
    (the weights', or the config's)."""
    if not isinstance(model, (MinkUNet, SPVCNN)):
        return
    from ..tensor import SparseTensor

    like = next(model.parameters())
    cube = torch.tensor([[0, x, y, z] for x in (0, 1) for y in (0, 1) for z in (0, 1)], dtype=torch.int32,
                        device=like.device)
    voxels = SparseTensor(torch.zeros(len(cube), model.in_channels, dtype=like.dtype, device=like.device), cube)
    inputs = (voxels,) if isinstance(model, MinkUNet) else (
        voxels, torch.arange(len(cube), device=like.device), cube[:, 1:].to(like.dtype) + 0.5, cube[:, 0].long())
    names = {module: name for name, module in model.named_modules()}
    entered: list[str] = []
    # every module but the model: the innermost entered is the one that failed (a pointsparse Linear checks its
    # input before the torch Linear inside it runs; with the leaves only, the last ReLU before it was named)
    hooks = [m.register_forward_pre_hook(lambda module, args: entered.append(names[module]))
             for m in model.modules() if m is not model]
    try:
        with evaluating(model), torch.no_grad():  # (each module given back its own mode)
            model(*inputs)
    except (ValueError, RuntimeError) as error:
        where = f"layer {entered[-1]} does not take" if entered else "the layers do not take"
        raise ValueError(f"{what} do not chain: {where} the width the layer before it gives "
                         f"({str(error).splitlines()[0]}); channel pruning narrows a layer, its BatchNorm and the "
                         "layers it feeds together") from None
    finally:
        for hook in hooks:
            hook.remove()


def _check_ends(model: nn.Module, where: str) -> None:
    """ValueError unless a MinkUNet's / SPVCNN's first conv takes its
    ``in_channels`` and its classifier gives its classes, as built:
    channel pruning keeps both, so narrower ones (which ``where`` gives)
    are another model's, not a pruned one."""
    if not isinstance(model, (MinkUNet, SPVCNN)):
        return
    spv = isinstance(model, SPVCNN)
    ends = (("unet.stem.0.0" if spv else "stem.0.0", ("weight",), 1, model.in_channels, "input channels",
             f"the config's in_channels is {model.in_channels}"),
            ("classifier" if spv else "classifier.fn", ("weight", "bias"), 0, model.num_classes, "outputs",
             f"the config lists {model.num_classes} classes"))
    for layer, names, axis, width, what, config in ends:
        module = model.get_submodule(layer)
        for name in names:
            # (the stored tensor: name_orig where a pruning mask re-parametrises it)
            tensor = module._parameters.get(name + "_orig", getattr(module, name, None))
            if isinstance(tensor, torch.Tensor) and tensor.shape[axis] != width:
                raise ValueError(f"{where} {layer}.{name} {tensor.shape[axis]} {what} where {config}: channel "
                                 "pruning keeps a model's input channels and classes, so these are another "
                                 "model's (config: model, in_channels, classes)")


def _submodule(model: nn.Module, name: str) -> nn.Module | None:
    """``model``'s submodule ``name``, or None where it has none (a key of
    another architecture: ``load_state_dict`` then names it unexpected)."""
    try:
        return model.get_submodule(name)
    except AttributeError:
        return None


def _bias_like(model: nn.Module, state_dict: dict) -> None:
    """A bias on every layer that has one in ``state_dict`` but none by
    construction (folded in by ``DependencyGraph.remove_masked``), of the
    layer's width, dtype and device (``_fit_shapes`` narrows it to the
    stored one, or refuses a stored one of another shape)."""
    for key, value in state_dict.items():
        for suffix in (".bias", ".bias_orig"):
            if key.endswith(suffix):
                module = _submodule(model, key[:-len(suffix)])
                if module is None or not hasattr(module, "bias"):  # (a ReLU took any "bias")
                    continue
                if module.bias is None and "bias_orig" not in module._parameters:
                    width = getattr(module, "out_channels", getattr(module, "out_features", None))
                    shape = (width,) if isinstance(width, int) else value.shape
                    # the layer's dtype and device, as load_state_dict casts every other tensor into the model's
                    like = module._parameters.get("weight_orig", getattr(module, "weight", None))
                    like = like if isinstance(like, torch.Tensor) else value
                    module.bias = nn.Parameter(like.new_zeros(shape))


def _mask_like(model: nn.Module, state_dict: dict) -> None:
    """Give ``model`` a (full) mask on every tensor stored masked in
    ``state_dict`` (``name_orig`` + ``name_mask``), so that it loads."""
    from ..prune import custom_from_mask
    for key in state_dict:
        if key.endswith("_orig") and key[:-5] + "_mask" in state_dict:
            module_name, _, tensor = key[:-5].rpartition(".")
            module = _submodule(model, module_name)
            if module is None or not isinstance(getattr(module, tensor, None), torch.Tensor):
                continue
            if tensor + "_orig" not in module._parameters:
                custom_from_mask(module, tensor, torch.ones_like(getattr(module, tensor), dtype=torch.bool))


def _fit_shapes(model: nn.Module, state_dict: dict) -> None:
    """Resize the parameters and buffers of ``model`` to ``state_dict``'s
    shapes (a channel-pruned checkpoint whose config records no widths has
    narrower layers than its config builds); every layer reads its widths
    from its tensors, so the model then runs, and its width attributes
    (``in_channels``, ``num_features``, ...) are set to them. ValueError
    for a tensor that is not a narrowing of the built one (wider, another
    rank or kernel). Returns whether it resized anything."""
    own = dict(model.named_parameters())
    own.update(dict(model.named_buffers()))
    narrowed = False
    for name, value in state_dict.items():
        if name not in own or own[name].shape == value.shape:
            continue
        narrowed = True
        built = tuple(own[name].shape)
        owner_name, _, leaf = name.rpartition(".")
        # Channel pruning narrows a tensor's channel dims and nothing else: a
        # wider tensor, another rank or another kernel volume is another
        # architecture, refused here rather than failing in a forward.
        kernel_dims = 1 if leaf in ("weight", "weight_orig", "weight_mask") and len(built) == 3 else 0
        if len(value.shape) != len(built) or any(v > b for v, b in zip(value.shape, built)) or \
                tuple(value.shape[:kernel_dims]) != built[:kernel_dims]:
            raise ValueError(f"checkpoint tensor {name!r} has shape {tuple(value.shape)} where the config builds "
                             f"{built}: only narrower channels (a channel-pruned model) are fitted; the config "
                             f"(model, cr, blocks, in_channels, classes, widths) does not describe these weights")
        owner = model.get_submodule(owner_name)
        # the model's dtype and device (load_state_dict casts into them, as it does the other tensors)
        if isinstance(own[name], nn.Parameter):
            setattr(owner, leaf, nn.Parameter(own[name].new_empty(value.shape), own[name].requires_grad))
        else:
            owner.register_buffer(leaf, own[name].new_empty(value.shape))
        if isinstance(owner, nn.modules.batchnorm._BatchNorm):
            owner.num_features = value.shape[0]
        elif isinstance(owner, nn.Linear) and leaf in ("weight", "weight_orig"):  # (out, in)
            owner.out_features, owner.in_features = value.shape
        elif isinstance(owner, Conv3d) and leaf in ("weight", "weight_orig"):  # (K, C_in, C_out)
            owner.in_channels, owner.out_channels = value.shape[1], value.shape[2]
    return narrowed
