"""Small ready-made tasks the ``pointsparse prune`` commands and the
experiments run the procedures on: a model factory and the callables every
procedure takes (``train_fn(model, steps, lr=None)``, ``eval_fn(model)``, a
training batch and its loss, an example input).

- ``digits``: scikit-learn's bundled 8x8 handwritten digits (1797 real images;
  needs the optional ``scikit-learn``), models ``mlp`` (64-300-100-10, the
  lottery-ticket LeNet), ``cnn`` (3 conv + BN) and ``deep`` (6 conv + BN).
- ``scene``: generated street scenes voxelised to sparse tensors, a chain of
  ``pointsparse.nn.Conv3d`` + BatchNorm (``sparse``), metric mIoU.
- ``checkpoint_task``: a trained MinkUNet or SPVCNN checkpoint and the user's clouds.

Every ``train_fn`` runs SGD steps through :class:`~pointsparse.app.trainer.Trainer`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn

from .._ext import MissingExtra
from .._modes import evaluating
from ..tensor import positive_int
from . import metrics
from .trainer import fit_steps


@dataclass
class Task:
    """A model factory (``make_model(seed)``: a freshly initialised model,
    drawn from the seed) and the callables a procedure needs;
    ``trained_model()``, where the task has one (a checkpoint's), the
    trained model the procedures start from instead of a fresh one."""

    name: str
    make_model: Callable[[int], nn.Module]
    train_fn: Callable  # (model, steps, lr=None) -> None
    eval_fn: Callable[[nn.Module], float]  # validation metric, higher is better
    test_fn: Callable[[nn.Module], float]  # held-out metric for reports
    batch_fn: Callable[[], tuple]  # a training batch (inputs, targets)
    loss_fn: Callable
    example_input: object
    lr: float
    train_steps: int
    metric: str
    trained_model: Callable[[], nn.Module] | None = None


def _sgd(model, lr, momentum=0.9, weight_decay=1e-4) -> torch.optim.SGD:
    return torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=lr, momentum=momentum,
                           weight_decay=weight_decay)


def _train_fn(batch_fn, loss_fn, default_lr: float):
    """``train_fn(model, steps, lr=default_lr)``: SGD steps through the shared :class:`Trainer`."""
    def train_fn(model, steps, lr=default_lr):
        fit_steps(model, steps, batch_fn, loss_fn, _sgd(model, lr))
    return train_fn


def _load_digits():
    try:
        from sklearn.datasets import load_digits
    except ImportError as e:  # optional dependency
        raise MissingExtra("the digits task needs the optional scikit-learn (pip install scikit-learn)") from e
    d = load_digits()
    x = torch.tensor(d.data, dtype=torch.float32) / 16.0
    y = torch.tensor(d.target, dtype=torch.long)
    perm = torch.randperm(len(x), generator=torch.Generator().manual_seed(0))
    return x[perm], y[perm]


#: The models of the digits task.
DIGITS_MODELS = ("mlp", "cnn", "deep")


def digits_model(kind: str, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    if kind == "mlp":
        return nn.Sequential(nn.Linear(64, 300), nn.ReLU(), nn.Linear(300, 100), nn.ReLU(), nn.Linear(100, 10))
    if kind == "cnn":
        return nn.Sequential(
            nn.Unflatten(1, (1, 8, 8)),
            nn.Conv2d(1, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
            nn.Conv2d(16, 32, 3, padding=1), nn.BatchNorm2d(32), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(32, 32, 3, padding=1), nn.BatchNorm2d(32), nn.ReLU(), nn.MaxPool2d(2),
            nn.Flatten(), nn.Linear(32 * 4, 10))
    if kind == "deep":
        layers: list[nn.Module] = [nn.Unflatten(1, (1, 8, 8))]
        chans = [1, 16, 16, 32, 32, 32, 32]
        for i in range(6):
            layers += [nn.Conv2d(chans[i], chans[i + 1], 3, padding=1), nn.BatchNorm2d(chans[i + 1]), nn.ReLU()]
            if i in (1, 3):
                layers.append(nn.MaxPool2d(2))
        layers += [nn.Flatten(), nn.Linear(32 * 4, 10)]
        return nn.Sequential(*layers)
    raise ValueError(f"digits model must be 'mlp', 'cnn' or 'deep'; got {kind!r}")


def digits_task(model: str = "mlp", seed: int = 0, batch_size: int = 64) -> Task:
    """Digits: 1000 training, 300 validation, 497 test images."""
    if model not in DIGITS_MODELS:  # (checked before the data: it failed later, in make_model)
        raise ValueError(f"digits model must be 'mlp', 'cnn' or 'deep'; got {model!r}")
    batch_size = positive_int(batch_size, "batch_size")
    x, y = _load_digits()
    xtr, ytr, xva, yva, xte, yte = x[:1000], y[:1000], x[1000:1300], y[1000:1300], x[1300:], y[1300:]
    gen = torch.Generator().manual_seed(seed)

    def batch_fn():
        idx = torch.randint(0, len(xtr), (batch_size,), generator=gen)
        return xtr[idx], ytr[idx]

    loss_fn = nn.functional.cross_entropy
    lr = 0.05 if model == "mlp" else 0.02

    train_fn = _train_fn(batch_fn, loss_fn, lr)

    def accuracy(m, xs, ys):
        with evaluating(m), torch.no_grad():
            return float((m(xs).argmax(1) == ys).float().mean())

    return Task(f"digits-{model}", lambda s=seed: digits_model(model, s), train_fn,
                lambda m: accuracy(m, xva, yva), lambda m: accuracy(m, xte, yte), batch_fn, loss_fn, xva[:64], lr,
                train_steps=600 if model == "mlp" else 400, metric="accuracy")


# --------------------------------------------------------------------- scenes
def street_points(n: int = 60000, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """A quick synthetic street: ground, two facades, poles, boxes (cars).
    Returns (points (n, 3), labels (n,)): 0 ground, 1 facade, 2 pole, 3 car."""
    g = torch.Generator().manual_seed(seed)
    parts, labels = [], []
    m = n // 4
    ground = torch.rand(m, 3, generator=g) * torch.tensor([60.0, 20.0, 0.0]) - torch.tensor([30.0, 10.0, 0.0])
    parts.append(ground); labels.append(torch.zeros(m, dtype=torch.long))
    for side in (-10.0, 10.0):
        f = torch.rand(m // 2, 3, generator=g) * torch.tensor([60.0, 0.0, 12.0]) + torch.tensor([-30.0, side, 0.0])
        parts.append(f); labels.append(torch.ones(m // 2, dtype=torch.long))
    for x in range(-25, 26, 10):
        a = torch.rand(m // 12, generator=g) * 6.2832
        pole = torch.stack([x + 0.15 * a.cos(), -8 + 0.15 * a.sin(), torch.rand(m // 12, generator=g) * 6], 1)
        parts.append(pole); labels.append(torch.full((m // 12,), 2, dtype=torch.long))
    for x in (-18.0, -5.0, 9.0, 21.0):
        car = torch.rand(m // 8, 3, generator=g) * torch.tensor([4.0, 1.8, 1.5]) + torch.tensor([x, 2.0, 0.0])
        parts.append(car); labels.append(torch.full((m // 8,), 3, dtype=torch.long))
    pts = torch.cat(parts)
    pts = pts + 0.02 * torch.randn(pts.shape, generator=g)
    return pts, torch.cat(labels)


def scene_tensor(seed: int, points: int = 6000, voxel_size: float = 0.5):
    """A generated street voxelised: (SparseTensor with xyz feats, voxel
    labels by majority vote of the voxel's points, ties to the smaller id)."""
    from ..data import DEFAULT_IGNORE, majority_labels
    from ..voxelize import voxelize
    pts, labels = street_points(points, seed)
    x, inverse = voxelize(pts, (pts - pts.mean(0)) / 10.0, voxel_size=voxel_size)
    vl = majority_labels(inverse.numpy(), labels.numpy(), len(x), DEFAULT_IGNORE)
    return x, torch.from_numpy(vl)


def sparse_model(seed: int = 0, width: int = 16, num_classes: int = 4) -> nn.Module:
    from .. import nn as spnn
    torch.manual_seed(seed)
    return nn.Sequential(
        spnn.Conv3d(3, width, 3), spnn.BatchNorm(width), spnn.ReLU(),
        spnn.Conv3d(width, 2 * width, 3), spnn.BatchNorm(2 * width), spnn.ReLU(),
        spnn.Conv3d(2 * width, 2 * width, 3), spnn.BatchNorm(2 * width), spnn.ReLU(),
        spnn.Conv3d(2 * width, num_classes, 1))


def scene_task(seed: int = 0, points: int = 6000, voxel_size: float = 0.5, width: int = 16,
               make_model: Callable | None = None) -> Task:
    """Generated scenes: 3 training scenes, one validation and one test scene;
    metric voxel mIoU over the 4 classes. ``make_model(seed)`` replaces the
    default sparse chain (for example with ``pointsparse.models.MinkUNet``)."""
    width = positive_int(width, "width")  # (before the scenes: a bad one failed later, in make_model)
    train = [scene_tensor(seed * 10 + i, points, voxel_size) for i in range(3)]
    val = scene_tensor(seed * 10 + 7, points, voxel_size)
    test = scene_tensor(seed * 10 + 8, points, voxel_size)
    state = {"i": 0}

    def batch_fn():
        state["i"] = (state["i"] + 1) % len(train)
        return train[state["i"]]

    def loss_fn(out, y):
        return nn.functional.cross_entropy(out.feats, y)

    train_fn = _train_fn(batch_fn, loss_fn, 0.05)

    def evaluate(m, data):
        with evaluating(m), torch.no_grad():
            pred = m(data[0]).feats.argmax(1)
        return metrics.mean_iou(metrics.confusion_matrix(pred, data[1], 4))

    factory = make_model or (lambda s=seed: sparse_model(s, width))
    return Task("scene", factory, train_fn, lambda m: evaluate(m, val), lambda m: evaluate(m, test), batch_fn,
                loss_fn, val[0], 0.05, train_steps=60, metric="mIoU")


# --------------------------------------------------------------------- a training checkpoint
def checkpoint_batches(state: dict, data=None, label_map=None, count: int = 1, skip_nonfinite: bool = False) -> list:
    """The first ``count`` clouds of ``data`` (default: the run's, read as
    the run read them: ``train --skip-nonfinite`` left out their NaN or inf
    points) as batches of one, voxelised as the checkpoint's run did;
    ``skip_nonfinite`` (``prune --skip-nonfinite``): the finite points of
    clouds some of whose positions are NaN or inf, which are refused
    otherwise (a ValueError naming the cloud and the flag)."""
    from .clouds import nonfinite_hold, skips_nonfinite

    with nonfinite_hold(skips_nonfinite(skip_nonfinite, state, own_data=data is None), "prune on the other points"):
        return _checkpoint_batches(state, data, label_map, count, skip_nonfinite)


def _checkpoint_batches(state: dict, data, label_map, count: int, skip_nonfinite: bool = False) -> list:
    from ..data import Batch, VoxelDataset
    from ..data.datasets import is_generated
    from .clouds import refuse_file_flags
    from .train import SEED_SCENES, generated_source
    config, saved = state["config"], state.get("args") or {}  # (None: no record, as its other readers take it)
    spec = data or saved.get("data") or ["generated"]
    if is_generated(spec):
        refuse_file_flags(spec, {"--label-map": label_map is not None, "--skip-nonfinite": skip_nonfinite},
                          own_data=not data)
        # The run's sensor (range, beams) and its training scenes (train.py: seeds from seed * SEED_SCENES).
        source = generated_source(spec, saved, count, int(saved.get("seed", 0)) * SEED_SCENES)
    else:
        from .clouds import files_source

        # (--data as eval reads --data, the run's data as it read them; files whose format takes another map by
        # default than the run's: moot where the clouds taken hold no labels, channels' example input; --data's
        # labelled files whose format reads them through another map of the run's classes than the run's, taken
        # by default: refused, as eval refuses to score them)
        source = files_source(state, spec, label_map, "--data" if data else "the run's data", data is not None,
                              config.get("ignore_index", 255), count, format_maps=data is not None)
        # (as eval refuses them: the labels would be another map's training ids; moot where the clouds taken
        # hold no labels and no map is typed: an unlabelled .bin sweep was refused for SemanticKITTI's classes)
        if source.classes is not None and (label_map is not None or any(
                source[i % len(source)].labels is not None for i in range(count))):
            from .evaluate import check_data_classes

            check_data_classes(source.classes, config["classes"], "--data" if data else "the run's data")
    samples = source
    if not is_generated(spec) and len(source):  # (features the model's training clouds lacked: 0, as eval has them)
        from .clouds import TrainedFeatures

        samples = TrainedFeatures(config).fit_all(source[i] for i in range(min(count, len(source))))
    dataset = VoxelDataset(samples, config["voxel_size"], config.get("ignore_index", 255))
    batches = [Batch.of([dataset[i % len(dataset)]]) for i in range(count)]
    want, got = config.get("in_channels"), batches[0].input.num_channels
    if isinstance(want, int) and got != want:  # (the model's own check named neither the data nor why it was read)
        where = (f"--data {' '.join(map(str, data))}" if data else "the run's data" if saved.get("data")
                 else "generated scenes (the checkpoint records no data of its run)")
        raise ValueError(f"{where}: {got} feature channels a voxel (the clouds' readers give x, y, z, intensity "
                         f"and rgb), but the checkpoint's {config.get('model', 'model')} model takes {want}: a model "
                         "of other inputs runs on tensors you make (the library), not on the commands' clouds")
    return batches


def require_labelled(batches, ignore_index: int, what: str, data=None, num_classes: int | None = None) -> None:
    """``ValueError`` where a batch of ``batches`` (one cloud each) holds no
    labelled voxel (no labels, or every label ``ignore_index``), or no point
    at all, which the message says: ``what`` (a procedure scoring by the
    loss or the mIoU) would run on a loss of NaN or an mIoU of nothing; or,
    given ``num_classes``, a label that is neither a class index nor
    ``ignore_index`` (raw labels read without their label map: the loss
    failed in torch, "Target 7 is out of bounds"), naming its cloud: its
    index among those taken and its file (where ``data``, a folder or
    several files, does not name it alone)."""
    words = [str(word) for word in data or ()]
    for i, batch in enumerate(batches):
        where = f"cloud {i} of --data {' '.join(words)}" if data else f"cloud {i} of the run's data"
        name = batch.names[0] if batch.names else None
        if name and [str(name)] != words:
            where += f" ({name})"
        if not len(batch.inverse):  # (its labels, were there any, are not to blame)
            raise ValueError(f"{what} needs clouds with points; {where} holds no points (an empty file, or every "
                             "position NaN or inf, which --skip-nonfinite leaves out)")
        if not bool((batch.labels != ignore_index).any()):  # (a cloud without labels is voxelised as all ignored)
            raise ValueError(f"{what} needs labelled clouds; {where} has no labelled voxel: no labels, or every label "
                             f"the ignore index {ignore_index} (raw labels the label map does not list are ignored "
                             "too): give clouds with labels")
        if num_classes is not None:
            from .evaluate import scored_labels

            scored_labels(batch.labels, num_classes, ignore_index, batch.names[0] or where)


def checkpoint_task(path, data=None, label_map=None, clouds: int = 4,
                    skip_nonfinite: bool = False) -> tuple[dict, Task]:
    """(the checkpoint's state, a :class:`Task` on its trained MinkUNet or
    SPVCNN and the user's clouds: the first ``clouds - 1`` train, the last
    validates; metric mIoU, of the voxels for a MinkUNet, of the points for
    an SPVCNN), so that AMC, NetAdapt and the other procedures run on a real
    model and real data; ``skip_nonfinite``: as :func:`checkpoint_batches`'.
    An SPVCNN's inputs are the tuples ``(voxels, inverse, points,
    point_batch)`` (its example input too; ``train_fn`` and the procedures
    call ``model(*inputs)``), its targets the points' labels. Its
    ``trained_model()`` is the checkpoint's model, its ``make_model(seed)``
    a fresh one of the same architecture and widths (:func:`fresh_model`)."""
    from ..prune.graph import widths
    from .evaluate import checkpoint_model
    from .scoring import _model_inputs, kept_labels, point_level, voxel_classes
    from .train import load_checkpoint
    state = load_checkpoint(path)
    # (a config or weights that make no model: refused now, before any data or --out)
    model = checkpoint_model(state, path)
    points, recorded = point_level(model), widths(model)  # (fresh_model's widths: read once, not per model made)
    del model
    batches = checkpoint_batches(state, data, label_map, clouds, skip_nonfinite)
    train, val = batches[:-1] or batches, batches[-1]
    ignore = state["config"].get("ignore_index", 255)
    classes = len(state["config"]["classes"])
    require_labelled(batches, ignore, "a procedure on a checkpoint (its loss and mIoU)", data, classes)
    cursor = {"i": 0}

    def trained_model():
        return checkpoint_model(state, path).eval()

    def make_model(seed=0):  # (the lottery's random re-init control, ...: not the trained weights)
        return fresh_model(state, seed, recorded)

    def batch_fn():
        cursor["i"] = (cursor["i"] + 1) % len(train)
        batch = train[cursor["i"]]
        return _model_inputs(batch, points), batch.point_labels if points else batch.labels

    def loss_fn(out, labels):  # (a model pruning voxels at stride 1: its kept voxels' logits, against their labels)
        if points:  # (SPVCNN: logits of every point)
            return nn.functional.cross_entropy(out, labels, ignore_index=ignore)
        return nn.functional.cross_entropy(out.feats, kept_labels(out, labels), ignore_index=ignore)

    def evaluate(model):
        with evaluating(model), torch.no_grad():
            if points:
                pred, labels = model(*_model_inputs(val, points)).argmax(1), val.point_labels
            else:  # (class 0 for a voxel pruned at stride 1)
                pred, labels = voxel_classes(model(val.input), len(val.labels)), val.labels
        return metrics.mean_iou(metrics.confusion_matrix(pred, labels, classes, ignore))

    lr = float((state.get("args") or {}).get("lr", 0.05)) * 0.1
    return state, Task("checkpoint", make_model, _train_fn(batch_fn, loss_fn, lr), evaluate, evaluate, batch_fn,
                       loss_fn, _model_inputs(val, points), lr, 60, "mIoU", trained_model)


def fresh_model(state: dict, seed: int = 0, recorded: dict | None = None) -> nn.Module:
    """A freshly initialised model (``torch.manual_seed(seed)``) of the
    training checkpoint ``state``'s architecture and widths (a
    channel-pruned one's, recorded in its config or only in its weights'
    shapes): every layer initialised as a layer of its width is, with the
    checkpoint's folded biases (zero) and full masks, so that its tensors
    are named and shaped as the trained model's. ``recorded``: the
    checkpoint model's ``prune.graph.widths`` where the caller has them
    (else its model is built to read them)."""
    from ..models import build_model, model_from_state
    from ..models.loading import shape_like
    from ..prune.graph import widths
    if recorded is None:
        recorded = widths(model_from_state(state))
    torch.manual_seed(seed)
    model = build_model(dict(state["config"], widths=recorded))
    for module in model.modules():  # (resize slices the dense model's tensors, drawn for wider layers)
        if hasattr(module, "reset_parameters"):
            module.reset_parameters()
    shape_like(model, state["model"])
    return model
