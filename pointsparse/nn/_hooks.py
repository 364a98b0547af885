"""Full backward hooks on modules of SparseTensors.

torch's ``register_full_backward_hook`` and
``register_full_backward_pre_hook`` see the gradients of a module's tensor
arguments and tensor outputs; a SparseTensor is neither, so torch warns that
the output is not a tensor and the hooks never fire. The package's modules
(:mod:`pointsparse.nn`'s and the model blocks of :mod:`pointsparse.models`)
take :class:`SparseBackwardHooks` first among their bases: the same two
methods, with the same signatures, handles and hook calls, where each
SparseTensor argument or output stands for its ``feats`` (a tensor argument
for itself, anything else None). ``grad_input`` and ``grad_output`` are
then tuples of the feats' gradients, positional arguments only (as torch's),
and a hook may return replacements as torch's may. torch's own class does the
bookkeeping (``torch.utils.hooks.BackwardHook``): the feats pass through its
identity function on the way in and out of the module, a forward pre-hook
and a forward hook of the module's own (registered with the first backward
hook, removed with the last: a module whose hooks are all removed runs as
one never hooked, on torch's fast call path) doing it.

Not covered: torch's process-wide ``register_module_full_backward_hook``,
and containers of torch's own (``nn.Sequential``) holding these modules;
those still warn and do not fire.
"""

from __future__ import annotations

import weakref
from collections import OrderedDict

import torch
from torch.utils.hooks import BackwardHook, RemovableHandle

from ..tensor import SparseTensor

_FULL = "_sparse_backward_hooks"
_PRE = "_sparse_backward_pre_hooks"
_CALLS = "_sparse_backward_calls"
_RUNNERS = "_sparse_backward_runners"  # (the ids of the two runners in the module's forward hook tables)
_DROP = "_sparse_backward_drop"  # (the last hook went during a forward: the runners go when it ends)


def _as_tensors(values: tuple) -> tuple:
    """Each SparseTensor in ``values`` as its feats, the rest as they are."""
    return tuple(v.feats if isinstance(v, SparseTensor) else v for v in values)


def _put_back(values: tuple, tensors: tuple) -> tuple:
    """``values`` with each SparseTensor's feats replaced by the tensor at its
    place in ``tensors`` (on the same coords and cache), the rest taken from
    ``tensors``."""
    return tuple(v.with_feats(t) if isinstance(v, SparseTensor) else t for v, t in zip(values, tensors))


def _owned(made: tuple, given: tuple) -> tuple:
    """The tensors of ``made`` that the hook's identity function returned
    for those of ``given``, cloned (the rest as they are): autograd forbids
    changing a custom function's output in place, and a module may change
    its input (an in-place ReLU, hooked) or the next module its output (a
    hooked BatchNorm's, before an in-place ReLU), eager or compiled. The
    gradients are the same (the clone passes them on unchanged)."""
    return tuple(m.clone() if isinstance(m, torch.Tensor) and m is not g else m for m, g in zip(made, given))


def _hooks_of(module) -> tuple[list, list]:
    full = module.__dict__.get(_FULL) or {}
    pre = module.__dict__.get(_PRE) or {}
    return list(full.values()), list(pre.values())


def _wrap_inputs(module, args):
    """The module's forward pre-hook: the feats of its positional arguments
    through the call's BackwardHook (a new one per call, as torch makes)."""
    if _FULL not in module.__dict__:  # (dropped in this call, before torch called it: nothing to run)
        return None
    full, pre = _hooks_of(module)
    calls = module.__dict__.setdefault(_CALLS, [])
    if not (full or pre) or not torch.is_grad_enabled():
        calls.append(None)
        return None
    hook = BackwardHook(module, full, pre)
    calls.append(hook)
    given = _as_tensors(args)
    return _put_back(args, _owned(hook.setup_input_hook(given), given))


def _wrap_outputs(module, args, output):
    """The module's forward hook: the output's feats (a SparseTensor, a
    tensor, or a tuple of them) through the call's BackwardHook."""
    calls = module.__dict__.get(_CALLS)
    hook = calls.pop() if calls else None
    if not calls and module.__dict__.get(_DROP) and not torch.compiler.is_compiling():
        _drop_runners_if_unhooked(module)  # (the last hook went during this forward: it ends now)
    if hook is None or output is None:
        return None
    given = _as_tensors(output if isinstance(output, tuple) else (output,))
    made = hook.setup_output_hook(given) if isinstance(output, tuple) else (hook.setup_output_hook(given[0]),)
    out = _put_back(output if isinstance(output, tuple) else (output,), _owned(made, given))
    if not isinstance(output, tuple):
        return out[0]
    return out if type(output) is tuple else type(output)(*out)  # (a named tuple's fields)


def _drop_runners_if_unhooked(module) -> None:
    """The two runners and the tables out of ``module`` once it holds no
    backward hook of either kind (the next hook registers them again)."""
    full, pre = _hooks_of(module)
    runners = module.__dict__.get(_RUNNERS)
    if full or pre or runners is None:
        module.__dict__.pop(_DROP, None)
        return
    if module.__dict__.get(_CALLS):  # (removed during a forward: that call's hooks still fire, as torch's)
        module.__dict__[_DROP] = True
        return
    before, after = runners
    if module._forward_pre_hooks.get(before) is _wrap_inputs:  # (an id torch may have given another hook since)
        del module._forward_pre_hooks[before]
    if module._forward_hooks.get(after) is _wrap_outputs:
        del module._forward_hooks[after]
        module._forward_hooks_always_called.pop(after, None)
    for key in (_FULL, _PRE, _RUNNERS, _CALLS, _DROP):
        module.__dict__.pop(key, None)


#: The forward hooks that run a module's backward hooks (bookkeeping of this
#: file's, not the user's: a copy of the module's hooks skips them).
RUNNERS = (_wrap_inputs, _wrap_outputs)


def copy_backward_hooks(source, target) -> None:
    """Register on ``target``, in their order, the backward hooks the user
    put on ``source``: the full ones and pre-hooks (this file's tables on a
    module of SparseTensors, else torch's own) and torch's older
    ``register_backward_hook`` ones."""
    full, pre = _hooks_of(source)
    if not (full or pre):
        torch_hooks = list(source._backward_hooks.values())
        pre = list(source._backward_pre_hooks.values())
        if source._is_full_backward_hook:
            full = torch_hooks
        else:
            for hook in torch_hooks:
                target.register_backward_hook(hook)
    for hook in full:
        target.register_full_backward_hook(hook)
    for hook in pre:
        target.register_full_backward_pre_hook(hook)


def _runners_of(module) -> tuple[int, int]:
    """The ids of ``module``'s two runners: those it holds already, in their
    places (a module copied with its forward hooks but not its tables, as
    compress did before, or pickled so: a second pair made every hook fire
    twice), the extra ones taken out, else a new pair at the end."""
    before = [k for k, h in module._forward_pre_hooks.items() if h is _wrap_inputs]
    after = [k for k, h in module._forward_hooks.items() if h is _wrap_outputs]
    keep = int(bool(before and after))  # (the first of each pair kept, where there is a pair)
    for k in before[keep:]:
        del module._forward_pre_hooks[k]
    for k in after[keep:]:
        del module._forward_hooks[k]
        module._forward_hooks_always_called.pop(k, None)
    if keep:
        module._forward_hooks_always_called[after[0]] = True
        return before[0], after[0]
    # (module-level functions: the module still deep-copies and pickles with them; always_call: a forward
    # that raised has its entry go)
    return (module.register_forward_pre_hook(_wrap_inputs).id,
            module.register_forward_hook(_wrap_outputs, always_call=True).id)


def place_runners(module, pre_order: list, post_order: list) -> None:
    """Put ``module``'s forward pre-hooks and forward hooks in the order of
    ``pre_order`` / ``post_order``: hook ids, where ``RUNNERS[0]`` /
    ``RUNNERS[1]`` stands for its runner (left out where it holds none);
    its hooks not named keep their order after them. ``formats.compress``
    gives a compressed layer the source's order: a hook before the runner
    sees (and changes) what the backward hooks see, as on the source."""
    runners = module.__dict__.get(_RUNNERS)
    for table, order, runner, index in ((module._forward_pre_hooks, pre_order, RUNNERS[0], 0),
                                        (module._forward_hooks, post_order, RUNNERS[1], 1)):
        ids = [(runners[index] if runners else None) if k is runner else k for k in order]
        ids = [k for k in ids if k is not None and k in table]
        ids += [k for k in table if k not in ids]
        items = dict(table)
        table.clear()
        table.update((k, items[k]) for k in ids)


class _HookHandle(RemovableHandle):
    """torch's handle of one backward hook, whose ``remove`` also takes the
    runners out of the module when it was the last hook (a weak reference:
    the handle keeps no module alive; unpickled, it removes the hook only)."""

    def __init__(self, hooks: OrderedDict, module) -> None:
        super().__init__(hooks)
        self._module_ref = weakref.ref(module)

    def remove(self) -> None:
        super().remove()
        module = self._module_ref() if hasattr(self, "_module_ref") else None
        if module is not None:
            _drop_runners_if_unhooked(module)


class SparseBackwardHooks:
    """Mixin (first among a module's bases): torch's full backward hooks on
    a module whose arguments and outputs are SparseTensors (the module doc
    above)."""

    def register_full_backward_hook(self, hook, prepend: bool = False) -> RemovableHandle:
        """As torch's: ``hook(module, grad_input, grad_output) -> tuple or
        None``, called once the gradients of the module's inputs are
        computed; a SparseTensor argument's or output's entry is its feats'
        gradient."""
        return self._add_sparse_backward_hook(_FULL, hook, prepend)

    def register_full_backward_pre_hook(self, hook, prepend: bool = False) -> RemovableHandle:
        """As torch's: ``hook(module, grad_output) -> tuple or None``, called
        when the gradients of the module's outputs are computed, before its
        inputs'; a SparseTensor output's entry is its feats' gradient."""
        return self._add_sparse_backward_hook(_PRE, hook, prepend)

    def _add_sparse_backward_hook(self, kind: str, hook, prepend: bool) -> RemovableHandle:
        if not callable(hook):
            raise TypeError(f"hook must be callable; got {type(hook).__name__}")
        if _FULL not in self.__dict__:  # (the first hook of either kind: both tables and the two runners)
            self.__dict__[_FULL], self.__dict__[_PRE] = OrderedDict(), OrderedDict()
            self.__dict__[_RUNNERS] = _runners_of(self)
        hooks = self.__dict__[kind]
        handle = _HookHandle(hooks, self)
        hooks[handle.id] = hook
        if prepend:
            hooks.move_to_end(handle.id, last=False)
        return handle
