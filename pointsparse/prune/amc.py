"""AMC: AutoML for model compression (He et al. 2018). A DDPG agent walks the
prunable layers of a chain network; at each it sees the layer (index,
channels, kernel size, FLOPs, FLOPs already removed and still to come, its
previous action) and answers a continuous action, the fraction of the
layer's output channels to remove. The pruned network (channels of lowest
L1 norm physically removed, optionally each consumer refitted by least
squares) is evaluated without fine-tuning and the reward is returned to every
step of the episode:

* ``reward="flops"``: ``-Error * log(FLOPs)`` (accuracy-guaranteed search);
* ``reward="error"`` with ``target_flops``: ``-Error``, with each action
  raised to the least value that still lets the remaining layers reach the
  FLOPs budget (resource-constrained search: every episode meets it).

The ratios of the best episode are exported (``AMCResult.ratios``) and are
applied with :func:`pointsparse.prune.surgery.apply_channel_ratios`."""

from __future__ import annotations

import copy
import json
import math
import random as _random
import warnings
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch
from torch import nn

from ..tensor import as_bool, nonnegative_int, positive_int
from . import _compat
from ._copyable import copy_model
from .adapters import in_channels, kernel_volume, out_channels
from .procedure import check_callable, check_int, check_path, check_real, metric_value
from .surgery import apply_channel_ratios, channel_groups, kept_count

REWARDS = ("flops", "error")
#: The most of a layer's output channels a search removes, unless given (``amc_search``'s ``max_ratio``).
DEFAULT_MAX_RATIO = 0.8


# ---------------------------------------------------------------- FLOPs model
@dataclass
class LayerInfo:
    name: str
    in_channels: int
    out_channels: int
    kernel_volume: int
    flops: float  # dense FLOPs on the example input
    producer: bool  # its output channels may be pruned
    input_from: str | None  # the producer whose channels feed it
    out_group: str | None = None  # the group its output channels belong to (coupled mode)
    in_groups: tuple = ()  # ((group or None, input channels), ...) along its input axis
    group_size: int = 0  # channels of out_group


def layer_infos(model: nn.Module, example_input, coupled: bool = False) -> list[LayerInfo]:
    """Every prunable layer of a chain with its dense FLOPs on
    ``example_input`` (from the core's ``sparsity_report``; for sparse
    convolutions these come from the kernel-map pair counts). With
    ``coupled=True`` the groups are the dependency graph's coupled groups
    (every layer of a residual or U-Net network; a group acts through its
    first producer)."""
    coupled = as_bool(coupled, "coupled")
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module; got {type(model).__name__}")
    from ..formats.modules import SparseConv3d, SparseLinear

    packed = [name for name, m in model.named_modules() if isinstance(m, (SparseConv3d, SparseLinear))]
    if packed:
        raise ValueError(f"layer {packed[0]!r} is a compressed layer (formats.compress), whose channels AMC cannot "
                         "cut: search the model before compressing it")
    report = _compat.sparsity_report(model, example_input)["layers"]
    if coupled:
        return _coupled_infos(model, example_input, report)
    groups = channel_groups(model)
    producers = {g.producer for g in groups}
    feeds = {g.consumer: g.producer for g in groups}
    named = dict(model.named_modules())
    out = []
    for name, row in report.items():
        m = named[name]
        producer, feeder = name in producers, feeds.get(name)
        out.append(LayerInfo(name, in_channels(m), out_channels(m), kernel_volume(m), float(row["dense_flops"] or 0),
                             producer, feeder, name if producer else None,
                             ((feeder, in_channels(m)),) if feeder else (), out_channels(m)))
    return out


def _coupled_infos(model, example_input, report) -> list[LayerInfo]:
    from .graph import DependencyGraph
    graph = DependencyGraph(model, example_input)
    out_of, in_of = {}, {}
    for g in graph.groups:
        for m in g.members:
            if m.role == "out":
                out_of[m.module] = g
            else:
                in_of.setdefault(m.module, []).append((g.name, m.stop - m.start))
    named = dict(model.named_modules())
    out = []
    for name, row in report.items():
        m, g = named[name], out_of.get(name)
        ins = tuple(in_of.get(name, ()))
        covered = sum(n for _, n in ins)
        if covered < in_channels(m):
            ins += ((None, in_channels(m) - covered),)
        out.append(LayerInfo(name, in_channels(m), out_channels(m), kernel_volume(m), float(row["dense_flops"] or 0),
                             g is not None and g.name == name, ins[0][0] if ins else None,
                             g.name if g is not None else None, ins, g.size if g is not None else 0))
    return out


def flops_for(infos: list[LayerInfo], ratios: dict[str, float]) -> float:
    """FLOPs of the network after removing ``ratios[group]`` of each group's
    channels (each layer scales with its kept output channels and the kept
    share of its inputs). A ratio for a name that is no group of ``infos``
    is a ValueError (it was ignored), a ratio outside [0, 1] one too
    (:func:`kept_count`)."""
    sizes = {i.out_group: i.group_size or i.out_channels for i in infos if i.out_group}
    if not isinstance(ratios, Mapping):
        raise TypeError(f"ratios must be a dict {{group name: ratio}}; got {type(ratios).__name__}")
    unknown = [g for g in ratios if g not in sizes]
    if unknown:
        raise ValueError(f"ratios names {unknown[0]!r}, no channel group of these layers (groups: "
                         f"{', '.join(map(repr, list(sizes)[:8]))}{', ...' if len(sizes) > 8 else ''})")
    kept = {}
    for g, n in sizes.items():
        try:
            kept[g] = kept_count(n, ratios.get(g, 0.0)) / n
        except (TypeError, ValueError) as error:
            raise type(error)(f"ratios[{g!r}]: {error}") from None
    total = 0.0
    for i in infos:
        f_out = kept[i.out_group] if i.out_group else 1.0
        width = sum(n for _, n in i.in_groups)
        f_in = sum(n * (kept[g] if g else 1.0) for g, n in i.in_groups) / width if width else 1.0
        total += i.flops * f_out * f_in
    return total


def _flops_floor(infos: list[LayerInfo], max_ratio: float = DEFAULT_MAX_RATIO) -> float:
    """The least fraction of the dense FLOPs a search can reach: what is left
    with every producer cut at ``max_ratio`` (0.0 for a network of no FLOPs)."""
    dense = flops_for(infos, {})
    return flops_for(infos, {i.name: max_ratio for i in infos if i.producer}) / dense if dense > 0 else 0.0


def uniform_ratio_for_flops(infos: list[LayerInfo], target_flops: float, max_ratio: float = 0.95) -> float:
    """The single ratio for every producer whose FLOPs come closest to
    ``target_flops`` from below (bisection). ``target_flops`` a finite
    number >= 0, ``max_ratio`` in [0, 1) (a ValueError naming either: nan
    and -1 gave a ratio)."""
    target_flops = check_real(target_flops, "target_flops", "a finite number >= 0", lambda v: v >= 0)
    max_ratio = check_real(max_ratio, "max_ratio", "a number in [0, 1)", lambda v: 0 <= v < 1)
    producers = [i.name for i in infos if i.producer]
    lo, hi = 0.0, max_ratio
    for _ in range(40):
        mid = (lo + hi) / 2
        if flops_for(infos, {n: mid for n in producers}) > target_flops:
            lo = mid
        else:
            hi = mid
    return hi


# ----------------------------------------------------------------- the agent
class _Actor(nn.Module):
    def __init__(self, state_dim: int, hidden: int) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(state_dim, hidden), nn.ReLU(), nn.Linear(hidden, hidden), nn.ReLU(),
                                 nn.Linear(hidden, 1), nn.Sigmoid())

    def forward(self, s):
        return self.net(s)


class _Critic(nn.Module):
    def __init__(self, state_dim: int, hidden: int) -> None:
        super().__init__()
        self.fs = nn.Linear(state_dim, hidden)
        self.fa = nn.Linear(1, hidden)
        self.out = nn.Sequential(nn.ReLU(), nn.Linear(hidden, hidden), nn.ReLU(), nn.Linear(hidden, 1))

    def forward(self, s, a):
        return self.out(self.fs(s) + self.fa(a))


class DDPG:
    """Deep deterministic policy gradient with target networks, a replay
    buffer and truncated-normal exploration, as AMC uses it."""

    def __init__(self, state_dim: int, hidden: int = 300, actor_lr: float = 1e-4, critic_lr: float = 1e-3,
                 tau: float = 0.01, discount: float = 1.0, buffer_size: int = 2000, batch_size: int = 64,
                 seed: int = 0) -> None:
        state_dim, hidden = check_int(state_dim, "state_dim", 1), check_int(hidden, "hidden", 1)
        batch_size, buffer_size = check_int(batch_size, "batch_size", 1), check_int(buffer_size, "buffer_size", 1)
        if buffer_size < batch_size:  # (else it never holds a batch, and never trains)
            raise ValueError(f"buffer_size {buffer_size} holds fewer transitions than a batch (batch_size "
                             f"{batch_size}): the agent would never train")
        for value, name in ((actor_lr, "actor_lr"), (critic_lr, "critic_lr")):
            check_real(value, name, "a finite number > 0", lambda v: v > 0)
        check_real(tau, "tau", "a number in (0, 1]", lambda v: 0 < v <= 1)
        check_real(discount, "discount", "a number in [0, 1]", lambda v: 0 <= v <= 1)
        seed = check_int(seed, "seed", 0)
        with torch.random.fork_rng(devices=[]):  # (seeded for the networks' init; the user's generator left alone)
            torch.manual_seed(seed)
            # (float32, as the states are, whatever torch's default dtype: a float64 default built float64 networks)
            self.actor, self.critic = _Actor(state_dim, hidden).float(), _Critic(state_dim, hidden).float()
        self.actor_t, self.critic_t = copy.deepcopy(self.actor), copy.deepcopy(self.critic)
        self.opt_a = torch.optim.Adam(self.actor.parameters(), lr=actor_lr)
        self.opt_c = torch.optim.Adam(self.critic.parameters(), lr=critic_lr)
        self.tau, self.discount, self.batch_size, self.buffer_size = tau, discount, batch_size, buffer_size
        self.buffer: list[tuple] = []
        self.rng = _random.Random(seed)
        self.gen = torch.Generator().manual_seed(seed)

    def act(self, state: torch.Tensor, noise: float) -> float:
        with torch.no_grad():
            mu = float(self.actor(state[None])[0, 0])
        if noise <= 0:
            return mu
        for _ in range(100):  # truncated normal on [0, 1]
            a = mu + noise * float(torch.randn((), generator=self.gen))
            if 0.0 <= a <= 1.0:
                return a
        return min(max(mu, 0.0), 1.0)

    def remember(self, s, a, r, s2, done) -> None:
        self.buffer.append((s, a, r, s2, done))
        if len(self.buffer) > self.buffer_size:
            self.buffer.pop(0)

    def update(self) -> bool:
        """One step on a sampled batch; False (nothing done) until the
        buffer holds ``batch_size`` transitions."""
        if len(self.buffer) < self.batch_size:
            return False
        batch = self.rng.sample(self.buffer, self.batch_size)
        s = torch.stack([b[0] for b in batch])
        a = torch.tensor([[b[1]] for b in batch], dtype=torch.float32)
        r = torch.tensor([[b[2]] for b in batch], dtype=torch.float32)
        s2 = torch.stack([b[3] for b in batch])
        done = torch.tensor([[float(b[4])] for b in batch], dtype=torch.float32)
        with torch.no_grad():
            target = r + self.discount * (1 - done) * self.critic_t(s2, self.actor_t(s2))
        loss_c = nn.functional.mse_loss(self.critic(s, a), target)
        self.opt_c.zero_grad()
        loss_c.backward()
        self.opt_c.step()
        loss_a = -self.critic(s, self.actor(s)).mean()
        self.opt_a.zero_grad()
        loss_a.backward()
        self.opt_a.step()
        with torch.no_grad():
            for net, tgt in ((self.actor, self.actor_t), (self.critic, self.critic_t)):
                for p, pt in zip(net.parameters(), tgt.parameters()):
                    pt.mul_(1 - self.tau).add_(self.tau * p)
        return True


# ------------------------------------------------------------------- search
@dataclass
class AMCResult:
    """The best episode's ratios (fraction of output channels removed per
    producer), its metric and FLOPs, and every episode; ``learned_episodes``:
    how many episodes the agent acted in after it had trained (0: every
    ratio came from the random warm-up or an untrained agent, a random
    search)."""

    ratios: dict[str, float]
    metric: float
    flops: float
    dense_flops: float
    reward: float
    history: list[dict] = field(default_factory=list)
    learned_episodes: int = 0

    def export(self, path) -> Path:
        """Write the ratios and the search summary as JSON."""
        path = check_path(path, "the JSON file to write")
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps({"ratios": self.ratios, "metric": self.metric, "flops": self.flops,
                                    "dense_flops": self.dense_flops, "reward": self.reward,
                                    "episodes": len(self.history), "learned_episodes": self.learned_episodes},
                                   indent=2))
        return path


def _states(infos: list[LayerInfo]) -> tuple[list[LayerInfo], list[list[float]]]:
    producers = [i for i in infos if i.producer]
    return producers, [[t, i.out_channels, i.in_channels, i.kernel_volume, i.flops] for t, i in enumerate(producers)]


@dataclass
class _Space:
    """What an episode acts on: the producers, their raw states and scales,
    the dense FLOPs, and the FLOPs budget (None: unconstrained)."""

    infos: list[LayerInfo]
    producers: list[LayerInfo]
    raw_states: list[list[float]]
    dense: float
    target: float | None
    max_ratio: float

    @property
    def scale(self) -> list[float]:
        return [max(max(s[j] for s in self.raw_states), 1e-12) for j in range(5)]

    def state(self, t: int, ratios: dict, prev: float, scale: list[float]) -> torch.Tensor:
        reduced = self.dense - flops_for(self.infos, ratios)
        rest = sum(p.flops for p in self.producers[t + 1:])
        return torch.tensor([v / sc for v, sc in zip(self.raw_states[t], scale)]
                            + [reduced / self.dense, rest / self.dense, prev], dtype=torch.float32)

    def within_budget(self, t: int, ratios: dict, a: float) -> float:
        """The least ratio >= ``a`` for producer ``t`` that keeps the budget
        reachable with every later producer at ``max_ratio`` (bisection)."""
        if self.target is None:
            return a
        lo, hi = a, self.max_ratio
        trial = dict(ratios, **{self.producers[t].name: a}, **{p.name: self.max_ratio for p in self.producers[t + 1:]})
        if flops_for(self.infos, trial) <= self.target:
            return a
        for _ in range(30):
            mid = (lo + hi) / 2
            trial[self.producers[t].name] = mid
            if flops_for(self.infos, trial) > self.target:
                lo = mid
            else:
                hi = mid
        return hi


def _check_search(eval_fn, episodes, warmup, reward, target_flops, max_ratio, reconstruct, coupled,
                  noise=0.5, noise_decay=0.95, seed=0) -> tuple[int, int, int]:
    check_callable(eval_fn, "eval_fn")
    as_bool(reconstruct, "reconstruct")
    as_bool(coupled, "coupled")
    if target_flops is not None:
        check_real(target_flops, "target_flops", ok=lambda v: v > 0,
                   what="a finite number > 0 (absolute FLOPs, or a fraction of the dense FLOPs when <= 1)")
    check_real(max_ratio, "max_ratio", ok=lambda v: 0 < v < 1, what="a number in (0, 1)")
    check_real(noise, "noise", ok=lambda v: v >= 0, what="a finite number >= 0")
    check_real(noise_decay, "noise_decay", ok=lambda v: 0 < v <= 1, what="a number in (0, 1]")
    seed = nonnegative_int(seed, "seed")
    episodes, warmup = positive_int(episodes, "episodes"), nonnegative_int(warmup, "warmup")
    if reward not in REWARDS:
        raise ValueError(f"reward must be one of {REWARDS}; got {reward!r}")
    if reward == "error" and target_flops is None:
        raise ValueError("reward='error' needs target_flops (the resource-constrained search)")
    if coupled and reconstruct:
        raise ValueError("reconstruct=True works on chain groups only (coupled=False)")
    return episodes, warmup, seed


def _space(model, example_input, coupled: bool, target_flops, max_ratio: float) -> _Space:
    infos = layer_infos(model, example_input, coupled)
    producers, raw_states = _states(infos)
    if not producers:
        raise ValueError("model has no layer whose output channels can be removed (needs a chain of >= 2 layers)")
    dense = flops_for(infos, {})
    target = None
    if target_flops is not None:
        target = float(target_flops) * (dense if target_flops <= 1 else 1.0)
        floor = _flops_floor(infos, max_ratio)
        if target < floor * dense:
            given = f"{target_flops:g} of the dense FLOPs, {target:.4g}" if target_flops <= 1 else \
                f"{target / dense:.4f} of the dense FLOPs"
            raise ValueError(f"target_flops {target_flops:g} ({given}) is below what max_ratio={max_ratio} reaches: "
                             f"{floor:.4f} of the dense FLOPs ({floor * dense:.4g})")
    return _Space(infos, producers, raw_states, dense, target, max_ratio)


def _episode(space: _Space, scale, act: Callable[[torch.Tensor], float]) -> tuple[dict, list, list]:
    """One pass over the producers: ``(ratios, states, actions)``."""
    ratios: dict[str, float] = {}
    states, actions = [], []
    prev = 0.0
    for t, info in enumerate(space.producers):
        s = space.state(t, ratios, prev, scale)
        a = space.within_budget(t, ratios, min(act(s), 1.0 - 1e-6) * space.max_ratio)
        ratios[info.name] = a
        states.append(s)
        actions.append(a / space.max_ratio)
        prev = a
    return ratios, states, actions


def _learn(agent: DDPG, states: list, actions: list, advantage: float, train: bool) -> bool:
    """Remember an episode's transitions and, when ``train``, update the
    agent once per step; whether it trained."""
    for t in range(len(states)):
        done = t == len(states) - 1
        agent.remember(states[t], actions[t], advantage, states[t + 1] if not done else states[t], done)
    trained = False
    if train:
        for _ in range(len(states)):
            trained = agent.update() or trained
    return trained


def _warn_unlearned(episodes: int, warmup: int, agent: DDPG, steps: int) -> None:
    """The RuntimeWarning of a search whose every episode was random: its
    ratios are a random search's best, not the agent's."""
    first = max(warmup, math.ceil(agent.batch_size / steps) - 1) + 1  # (the first episode a trained agent acts in)
    random = min(warmup, episodes)
    warnings.warn(f"AMC ran no learned episode: of its {episodes} episodes, {random} "
                  f"{'was' if random == 1 else 'were'} random warm-up and the agent trains only once it holds "
                  f"batch_size={agent.batch_size} transitions ({steps} per episode), so the ratios found are a random "
                  f"search's best, not the agent's (give episodes > {first})",
                  RuntimeWarning, stacklevel=3)


def _metric(value, episode: int) -> float:
    """``eval_fn``'s metric of an episode's pruned copy as a float in [0, 1]
    (its error ``1 - metric`` makes the reward: a NaN would poison the
    baseline and the agent, a percentage reward keeping FLOPs)."""
    try:
        metric = metric_value(value)  # (the procedures' reading: a number, a one-element tensor or array)
    except TypeError:
        raise TypeError(f"eval_fn must return a number (the metric in [0, 1]); got {type(value).__name__}") from None
    if not 0.0 <= metric <= 1.0:  # (NaN too)
        raise ValueError(f"eval_fn returned {metric} for episode {episode}'s pruned copy; AMC needs a metric in "
                         "[0, 1] (accuracy, mIoU as a fraction): its error 1 - metric makes the reward")
    return metric


def amc_search(model: nn.Module, eval_fn: Callable[[nn.Module], float], example_input, episodes: int = 100,
               warmup: int = 20, reward: str = "flops", target_flops: float | None = None,
               max_ratio: float = DEFAULT_MAX_RATIO, reconstruct: bool = False, calibration_input=None,
               noise: float = 0.5, noise_decay: float = 0.95, seed: int = 0, agent_kwargs: dict | None = None,
               log: Callable[[str], None] | None = None, coupled: bool = False) -> AMCResult:
    """Search per-layer channel ratios for a chain ``model`` (left
    unchanged). ``eval_fn(pruned_copy)`` is the validation metric in [0, 1]
    (accuracy, mIoU); the error is ``1 - metric``. ``target_flops`` (absolute
    FLOPs, or a fraction of the dense FLOPs when <= 1) makes the search
    resource-constrained: every episode's ratios meet it. ``coupled=True``
    acts on every coupled channel group of the dependency graph (residual and
    U-Net networks whole; the ratios are then keyed by group name and applied
    with ``apply_channel_ratios(..., example_input=...)``)."""
    episodes, warmup, seed = _check_search(eval_fn, episodes, warmup, reward, target_flops, max_ratio, reconstruct,
                                           coupled, noise, noise_decay, seed)
    if log is not None:  # (called after the first episode's work)
        check_callable(log, "log")
    if agent_kwargs is not None and not isinstance(agent_kwargs, Mapping):
        raise TypeError(f"agent_kwargs must be a dict of DDPG arguments or None; got {type(agent_kwargs).__name__}")
    if agent_kwargs is not None and "seed" in agent_kwargs:
        raise TypeError("agent_kwargs must not hold 'seed': amc_search's own seed seeds the agent")
    try:  # (before the model's trace: a wrong keyword costs none)
        agent = DDPG(8, seed=seed, **(agent_kwargs or {}))
    except (TypeError, ValueError) as error:  # (its own argument's name, or Python's "unexpected keyword argument")
        raise type(error)(f"agent_kwargs: {error}") from None
    space = _space(model, example_input, coupled, target_flops, max_ratio)
    scale, dense = space.scale, space.dense
    rng = _random.Random(seed)
    best: AMCResult | None = None
    baseline = None
    history = []
    sigma = noise
    trained, learned = False, 0
    for ep in range(episodes):
        learned += ep >= warmup and trained
        ratios, states, actions = _episode(space, scale, lambda s: rng.random() if ep < warmup else agent.act(s, sigma))
        pruned = copy_model(model)
        apply_channel_ratios(pruned, ratios, reconstruct, calibration_input,
                             example_input=example_input if coupled else None)
        metric = _metric(eval_fn(pruned), ep)
        flops = flops_for(space.infos, ratios)
        r = -(1.0 - metric) * math.log(flops) if reward == "flops" else -(1.0 - metric)
        history.append({"episode": ep, "reward": r, "metric": metric, "flops": flops, "ratios": dict(ratios)})
        if best is None or r > best.reward:
            best = AMCResult(dict(ratios), metric, flops, dense, r)
        baseline = r if baseline is None else 0.95 * baseline + 0.05 * r
        trained = _learn(agent, states, actions, r - baseline, ep >= warmup) or trained
        if ep >= warmup:
            sigma *= noise_decay
        if log is not None:
            log(f"episode {ep:3d}  metric {metric:.4f}  FLOPs {flops / dense:.3f} of dense  reward {r:.4f}")
    best.history, best.learned_episodes = history, learned
    if learned == 0:
        _warn_unlearned(episodes, warmup, agent, len(space.producers))
    return best
