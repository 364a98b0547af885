"""RigL sparse training (Evci et al. 2020): the network is sparse from the
start; every ``update_interval`` training steps each layer drops the
``f(t)`` fraction of its active weights with the smallest magnitude and
regrows as many inactive connections with the largest gradient magnitude
(new weights start at zero), ``f(t) = alpha/2 (1 + cos(pi t / end_step))``.
Layer densities are uniform or Erdos-Renyi-Kernel (ERK).

The masks are applied to the weights directly (a zero weight still gets its
dense gradient, which the grow step needs). Use it around any training loop::

    rigl = RigL(model, density=0.1, end_step=750)
    with rigl:                       # hooks every torch optimizer stepping these weights
        train_fn(model, 1000)

or ``rigl.attach(optimizer)`` for an optimizer you hold. A training step
taken by several optimizers, each stepping its own layers, counts once: a
step counts when its optimizer steps weights already stepped since the last
counted step (or no weights were), so a new optimizer for the same weights
counts from its first step; one stepping none of the layers' weights never
counts; one optimizer step seen by several of RigL's hooks (the context and
``attach`` both) counts once. ``rigl.state_dict()`` / ``load_state_dict()`` carry the masks and the
step count into a checkpoint, so that a run resumes where it stopped."""

from __future__ import annotations

import math

import torch
from torch import nn

from ..tensor import positive_int
from .adapters import kernel_extents, layout_of, prunable_layers, used_mask
from .procedure import check_fraction, check_int

DISTRIBUTIONS = ("uniform", "erk")


def _kernel_dims(module: nn.Module) -> list[int]:
    """The weight's dims, a sparse conv's flattened kernel volume spelled out
    as its 3-D kernel (the layout says which axis is the kernel); a
    ``kernel_region`` conv's kernel dims are the box its region spans
    (:func:`.adapters.kernel_extents`: the cross's 3, 3, 3; offsets 0 and 1
    of a 3x3x3 kernel 1, 1, 2)."""
    w = module.weight
    layout = layout_of(module)
    kernel = getattr(module, "kernel_size", None)
    if layout.kernel_axes == (0,) and isinstance(kernel, tuple):
        return [*kernel_extents(module), w.shape[layout.in_axis], w.shape[layout.out_axis]]
    return list(w.shape)


def erk_densities(model: nn.Module, density: float, layers=None) -> dict[str, float]:
    """Erdos-Renyi-Kernel: layer density proportional to
    ``sum(dims) / prod(dims)`` (kernel dims and both channel counts), scaled so
    the overall density is ``density``; layers that would exceed 1 are dense
    (and a layer without weights, ``Linear(8, 0)``).
    A layer's size is its weights' count (a ``kernel_region`` conv's region's,
    its kernel dims the region's extent on each axis)."""
    check_fraction(density, "density", low_open=True, high_open=False)
    chosen = prunable_layers(model, layers)
    sizes = {n: int(used_mask(m).sum()) for n, m in chosen}
    # (the product of the dims is the layer's size but for a region conv: its region's weights)
    raw = {n: sum(_kernel_dims(m)) / sizes[n] if sizes[n] else 0.0 for n, m in chosen}
    dense: set[str] = {n for n in sizes if not sizes[n]}  # a layer without weights: nothing to prune
    while True:
        divisor = rhs = 0.0
        for n in sizes:
            if n in dense:
                rhs -= sizes[n] * (1.0 - density)
            else:
                rhs += sizes[n] * density
                divisor += raw[n] * sizes[n]
        if divisor == 0:
            return {n: 1.0 for n in sizes}
        eps = rhs / divisor
        over = [n for n in sizes if n not in dense and raw[n] * eps > 1.0]
        if not over:
            return {n: 1.0 if n in dense else raw[n] * eps for n in sizes}
        dense.update(over)


class RigL:
    """Dynamic sparse training state: masks, densities and the update rule.
    The first masks are random, drawn among the weights that are not zero
    first (a model already sparse keeps its weights)."""

    def __init__(self, model: nn.Module, density: float = 0.1, distribution: str = "erk",
                 update_interval: int = 100, end_step: int = 1000, drop_fraction: float = 0.3, layers=None,
                 seed: int = 0) -> None:
        check_fraction(density, "density", low_open=True, high_open=False)
        check_fraction(drop_fraction, "drop_fraction", high_open=False)
        if distribution not in DISTRIBUTIONS:
            raise ValueError(f"distribution must be one of {DISTRIBUTIONS}; got {distribution!r}")
        update_interval = positive_int(update_interval, "update_interval")
        end_step = positive_int(end_step, "end_step")
        seed = check_int(seed, "seed", 0)
        self.model = model
        self.layers = prunable_layers(model, layers)
        for n, m in self.layers:  # (its weight is computed from weight_orig at each forward: masks written
            if "weight_orig" in m._parameters:  # into it would never be in effect, and it gets no gradient)
                raise ValueError(f"layer {n!r} is already pruned (weight_orig, weight_mask); RigL owns the masks "
                                 "of its layers: pass an unpruned model (prune.remove first) or leave the layer "
                                 "out of layers")
        owner: dict[int, str] = {}
        for n, m in self.layers:  # (two masks multiplied into one tensor: neither layer at its density)
            first = owner.setdefault(id(m.weight), n)
            if first != n:
                raise ValueError(f"layers {first!r} and {n!r} share one weight; RigL keeps one mask per weight: "
                                 "pass one of them in layers")
        self.update_interval = update_interval
        self.end_step = end_step
        self.alpha = drop_fraction
        self.step_count = 0
        self.updates = 0
        self._stepped: set[int] = set()  # the layers' weights (ids) stepped since the last counted step
        self._pending: set[int] = set()  # optimizers (ids) in a step that no post-step hook has taken yet
        if distribution == "uniform":
            self.densities = {n: density for n, _ in self.layers}
        else:
            self.densities = erk_densities(model, density, [n for n, _ in self.layers])
        g = torch.Generator().manual_seed(seed)
        # the layers' weights (a kernel_region conv's region): the masks choose among them only; the values
        # outside (never run) keep a True mask, are never dropped or grown and count in no density
        self.used = {n: used_mask(m) for n, m in self.layers}
        self.masks: dict[str, torch.Tensor] = {}
        for n, m in self.layers:
            used = self.used[n].flatten().cpu()
            numel = int(used.sum())
            keep = max(1, int(round(self.densities[n] * numel)))
            flat = ~used
            drawn = used.nonzero().flatten()[torch.randperm(numel, generator=g)]
            # the weights that are not zero first, in the drawn order (the same masks where none is): on a model
            # a RigL has already masked (built twice, static_sparse then RigL) the masks keep its weights, not a
            # random share of them (the densities multiplied, while density() said one)
            zero = (m.weight.detach().flatten() == 0).cpu()[drawn]
            flat[drawn[torch.argsort(zero.to(torch.int8), stable=True)][:keep]] = True
            self.masks[n] = flat.reshape(m.weight.shape).to(m.weight.device)
        self._handle, self._depth = None, 0
        # What these first masks zero, until the first step: a run resumed by loading the model, building its
        # RigL and then load_state_dict gets back the weights the loaded masks keep (see _restore_zeroed).
        self._zeroed = {n: m.weight.detach()[~self.masks[n]].clone() for n, m in self.layers}
        self.apply_masks()
        self._untouched = {n: (id(m.weight), m.weight._version) for n, m in self.layers}

    # ------------------------------------------------------------------ masks
    def drop_fraction_at(self, step: int) -> float:
        """The cosine-decayed drop fraction at optimizer step ``step``."""
        return self.alpha / 2.0 * (1.0 + math.cos(math.pi * min(step, self.end_step) / self.end_step))

    def apply_masks(self, optimizer: torch.optim.Optimizer | None = None) -> None:
        """Zero the inactive weights (and their optimizer state)."""
        with torch.no_grad():
            for n, m in self.layers:
                mask = self.masks[n]
                m.weight.mul_(mask)
                if optimizer is not None:
                    for v in optimizer.state.get(m.weight, {}).values():
                        if isinstance(v, torch.Tensor) and v.shape == mask.shape:
                            v.mul_(mask)

    def density(self) -> float:
        """The kept fraction of the layers' weights (a ``kernel_region`` conv's region's)."""
        kept = sum(int((mk & self.used[n]).sum()) for n, mk in self.masks.items())
        return kept / sum(int(self.used[n].sum()) for n in self.masks)

    def update(self) -> dict[str, int]:
        """One drop/grow step from the current weights and gradients; returns
        the connections changed per layer (the layer density is unchanged).
        Dropped and grown weights are zero afterwards, so the weights hold the
        stated density at once (not only after the next :meth:`apply_masks`)."""
        fraction = self.drop_fraction_at(self.step_count)
        changed = {}
        for n, m in self.layers:
            if not m.weight.requires_grad:
                raise ValueError(f"layer {n!r} is frozen (requires_grad=False): RigL grows connections by their "
                                 "gradient; leave the layer out of layers")
            if m.weight.grad is None:
                raise RuntimeError(f"layer {n!r} has no gradient: call update after backward")
            mask, used = self.masks[n].flatten(), self.used[n].flatten()
            active, numel = int((mask & used).sum()), int(used.sum())
            k = int(math.ceil(fraction * active)) if active < numel else 0
            k = min(k, active - 1, numel - active)
            if k <= 0:
                changed[n] = 0
                continue
            w = m.weight.detach().flatten().abs()
            drop_score = torch.where(mask & used, w, torch.full_like(w, float("inf")))
            drop = torch.topk(drop_score, k, largest=False).indices
            new_mask = mask.clone()
            new_mask[drop] = False
            grad = m.weight.grad.detach().flatten().abs()
            grow_score = torch.where(new_mask | ~used, torch.full_like(grad, -1.0), grad)
            grow = torch.topk(grow_score, k).indices
            new_mask[grow] = True
            with torch.no_grad():  # grown connections start at zero, dropped ones are zero from now on
                m.weight.masked_fill_((new_mask != mask).reshape(m.weight.shape), 0.0)  # (any strides)
            changed[n] = int((new_mask != mask).sum()) // 2
            self.masks[n] = new_mask.reshape(m.weight.shape)
        self.updates += 1
        return changed

    def step(self, optimizer: torch.optim.Optimizer | None = None) -> None:
        """Call after every ``optimizer.step()``: count the training step, run
        a drop / grow update every ``update_interval`` steps before
        ``end_step``, and re-apply the masks. A second optimizer stepping
        other layers of the same training step is not counted again (see the
        module's docstring), nor one stepping none of the layers' weights;
        ``optimizer=None`` always counts."""
        self._step(optimizer, set() if optimizer is None else self._owned(optimizer))

    def _step(self, optimizer, owned: set[int]) -> None:
        """:meth:`step` with ``optimizer``'s :meth:`_owned` weights known."""
        self._zeroed = {}  # (trained from now on: the first masks' zeros are the run's)
        if optimizer is None or (owned and (not self._stepped or owned & self._stepped)):
            self._stepped = owned
            self.step_count += 1
            if self.step_count % self.update_interval == 0 and self.step_count < self.end_step:
                self.update()
        else:  # another optimizer's share of the step just counted (or none of the layers' weights)
            self._stepped |= owned
        self.apply_masks(optimizer)

    # ------------------------------------------------------------------ state
    def state_dict(self) -> dict:
        """What a resumed run needs, as an optimizer's ``state_dict``: the
        masks (per layer name, on the CPU), the step and update counts, the
        densities and the schedule (``update_interval``, ``end_step``,
        ``drop_fraction``). Plain tensors and numbers (``torch.load`` with
        ``weights_only=True`` reads it)."""
        return {"masks": {n: mk.detach().cpu().clone() for n, mk in self.masks.items()},
                "step_count": self.step_count, "updates": self.updates, "densities": dict(self.densities),
                "update_interval": self.update_interval, "end_step": self.end_step, "drop_fraction": self.alpha}

    def load_state_dict(self, state: dict) -> None:
        """Take a :meth:`state_dict` of a RigL over the same layers (names and
        weight shapes) and apply its masks to the weights; the next step
        counts as the saved run's next (load the model's and the optimizer's
        state as well, before building this RigL or after it: the values its
        first masks zeroed come back where the loaded masks keep them). Refused whole, before anything changes, where the
        layers, shapes or counts do not fit."""
        if not isinstance(state, dict):
            raise TypeError(f"state_dict must be a dict from RigL.state_dict(); got {type(state).__name__}")
        keys = ("masks", "step_count", "updates", "densities", "update_interval", "end_step", "drop_fraction")
        missing = [k for k in keys if k not in state]
        if missing or not isinstance(state["masks"], dict) or not isinstance(state["densities"], dict):
            raise ValueError(f"state_dict is not a RigL state: missing {missing or ['masks and densities as dicts']}")
        names = [n for n, _ in self.layers]
        if sorted(state["masks"]) != sorted(names):
            raise ValueError(f"state_dict holds masks of layers {sorted(state['masks'])}; this RigL's layers are "
                             f"{sorted(names)}")
        masks = {}
        for n, m in self.layers:
            mask = state["masks"][n]
            if not isinstance(mask, torch.Tensor) or mask.dtype != torch.bool or mask.shape != m.weight.shape:
                got = tuple(mask.shape) if isinstance(mask, torch.Tensor) else type(mask).__name__
                raise ValueError(f"state_dict's mask of layer {n!r}: expected a bool tensor of shape "
                                 f"{tuple(m.weight.shape)} (the weight's); got {got}")
            mask = mask.to(m.weight.device)
            if bool((~mask & ~self.used[n]).any()):
                raise ValueError(f"state_dict's mask of layer {n!r} drops weights outside the layer's kernel region")
            masks[n] = mask.clone()
        step_count = check_int(state["step_count"], "state_dict's step_count", 0)
        updates = check_int(state["updates"], "state_dict's updates", 0)
        update_interval = positive_int(state["update_interval"], "state_dict's update_interval")
        end_step = positive_int(state["end_step"], "state_dict's end_step")
        drop_fraction = check_fraction(state["drop_fraction"], "state_dict's drop_fraction", high_open=False)
        densities = {n: check_fraction(state["densities"].get(n, self.densities[n]), f"state_dict's densities[{n!r}]",
                                       high_open=False) for n in names}  # (checked before anything changes)
        self._restore_zeroed()
        self.masks = masks
        self.step_count, self.updates = step_count, updates
        self.update_interval, self.end_step, self.alpha = update_interval, end_step, drop_fraction
        self.densities = densities
        self._stepped = set()
        self.apply_masks()

    def _restore_zeroed(self) -> None:
        """Give back the values this RigL's first masks zeroed, in each layer
        whose weight nothing has written since (no step, no load of the
        model's state): they are the loaded model's, which the masks of
        :meth:`load_state_dict` may keep."""
        with torch.no_grad():
            for n, m in self.layers:
                if n in self._zeroed and self._untouched[n] == (id(m.weight), m.weight._version):
                    m.weight[~self.masks[n]] = self._zeroed[n]
        self._zeroed = {}

    # ------------------------------------------------------------------ hooks
    def _owned(self, optimizer) -> set[int]:
        """The ids of the layers' weights that ``optimizer`` steps."""
        ids = {id(m.weight) for _, m in self.layers}
        return {id(p) for group in optimizer.param_groups for p in group["params"]} & ids

    def _hooks(self, every: bool):
        """A pre- and a post-step hook: the pre hook marks the optimizer's
        step, the post hook takes it once (RigL used as a context and also
        attached, or attached twice: each optimizer step counts once).
        ``every``: also for an optimizer stepping none of the layers'
        weights (it then only re-applies the masks)."""
        def pre(opt, args, kwargs):
            self._pending.add(id(opt))

        def post(opt, args, kwargs):
            if id(opt) not in self._pending:  # (another of RigL's hooks took this step)
                return
            self._pending.discard(id(opt))
            owned = self._owned(opt)
            if owned or every:
                self._step(opt, owned)
        return pre, post

    def attach(self, optimizer: torch.optim.Optimizer) -> "_Handles":
        """Run :meth:`step` after every step of ``optimizer``; returns a handle
        whose ``remove()`` takes the hooks off."""
        pre, post = self._hooks(every=True)
        return _Handles([optimizer.register_step_pre_hook(pre), optimizer.register_step_post_hook(post)])

    def __enter__(self) -> "RigL":
        from torch.optim.optimizer import register_optimizer_step_post_hook, register_optimizer_step_pre_hook

        self._depth += 1  # (nested: one pair of hooks, off at the outermost exit)
        if self._handle is None:
            pre, post = self._hooks(every=False)
            self._handle = _Handles([register_optimizer_step_pre_hook(pre), register_optimizer_step_post_hook(post)])
        return self

    def __exit__(self, *exc) -> None:
        self._depth = max(self._depth - 1, 0)
        if self._depth == 0 and self._handle is not None:
            self._handle.remove()
            self._handle = None
        self.apply_masks()


class _Handles:
    """The hooks :meth:`RigL.attach` registered: ``remove()`` takes them off."""

    def __init__(self, handles) -> None:
        self.handles = handles

    def remove(self) -> None:
        for h in self.handles:
            h.remove()

    def __enter__(self) -> "_Handles":
        return self

    def __exit__(self, *exc) -> None:
        self.remove()


def static_sparse(model: nn.Module, density: float, distribution: str = "erk", layers=None, seed: int = 0) -> RigL:
    """A fixed random sparse mask (RigL with no updates): the static baseline."""
    return RigL(model, density, distribution, update_interval=1, end_step=1, layers=layers, seed=seed)
