"""Checkpoints are data, never code: a pickled payload is refused, a damaged
file is refused naming it, writes are atomic with per-process names, a second
run on the same --out is refused, and diverged training stops with an error."""

from __future__ import annotations

import argparse
import collections
import io
import os
import pickle
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from pointsparse import checkpoint
from pointsparse.app import train as tr

ROOT = Path(__file__).resolve().parents[1]
TINY = ["--data", "generated", "--scenes", "2", "--val-scenes", "1", "--beams", "16", "--azimuth-steps", "192",
        "--max-range", "16", "--cr", "0.125", "--blocks", "1", "--voxel-size", "0.5", "--batch-size", "2",
        "--no-progress", "--seed", "3"]

pytestmark = pytest.mark.usefixtures("one_thread")


class Payload:
    """Unpickling this runs code (it touches a file)."""

    def __init__(self, target: str) -> None:
        self.target = target

    def __reduce__(self):
        return (Path.touch, (Path(self.target),))


def _parse(argv):
    parser = argparse.ArgumentParser()
    tr.add_arguments(parser)
    return parser.parse_args(argv)


def test_round_trip_keeps_tensors_and_plain_data(tmp_path):
    state = {"model": {"w": torch.randn(3, 4), "n": torch.tensor(7)}, "config": {"classes": ["a", "b"], "cr": 0.5},
             "history": {"loss": [1.0, float("nan")]}, "rng": torch.get_rng_state(), "none": None}
    checkpoint.save(tmp_path / "c.pt", state)
    back = checkpoint.load(tmp_path / "c.pt")
    assert torch.equal(back["model"]["w"], state["model"]["w"]) and back["config"] == state["config"]
    assert torch.equal(back["rng"], state["rng"]) and back["none"] is None


def test_save_refuses_what_load_would_refuse(tmp_path):
    """save wrote any picklable state, load reads data only: a numpy number
    (a metric from np.mean), a Path or an argparse.Namespace made a file that
    no run could load back ("holds Python objects other than tensors"),
    found only when resuming. save refuses it (TypeError naming the object's
    type), writing nothing and leaving an earlier checkpoint whole."""
    import numpy as np

    path = tmp_path / "c.pt"
    checkpoint.save(path, {"config": {"cr": 0.5}})
    before = path.read_bytes()
    for value, name in ((np.float64(0.5), "numpy"), (Path("data"), "pathlib"),
                        (argparse.Namespace(lr=0.1), "argparse.Namespace")):
        with pytest.raises(TypeError, match=f"state holds an object of {name}.*checkpoint.load refuses"):
            checkpoint.save(path, {"config": {"cr": 0.5}, "history": {"best": [value]}})
        assert path.read_bytes() == before and sorted(p.name for p in tmp_path.iterdir()) == ["c.pt"]
    assert checkpoint.load(path) == {"config": {"cr": 0.5}}


class Allowed:
    """A class a caller lets torch.load take (torch.serialization.safe_globals)."""


Pair = collections.namedtuple("Pair", "a b")


def test_save_names_where_the_state_holds_what_load_refuses(tmp_path):
    """save named the refused object by the global in torch's error text:
    for a numpy number the function that rebuilds it
    (numpy._core.multiarray.scalar), never where it is. It names the object's
    type and its place in the state, a dict key too; an object torch is
    told to allow is not blamed, and a code-running object is named without
    running."""
    import numpy as np

    path = tmp_path / "c.pt"
    marker = tmp_path / "ran"
    for state, where, name in (
            ({"config": {"cr": 0.5}, "history": {"best": [0.1, np.float64(0.5)]}}, "state['history']['best'][1]",
             "numpy.float64"),
            ({"paths": {Path("data"): 1}}, "a key of state['paths']", "pathlib.PosixPath"),
            ({"x": (1, Pair(1, 2))}, "state['x'][1]", "test_checkpoint.Pair"),
            ({"model": {}, "x": Payload(str(marker))}, "state['x']", "test_checkpoint.Payload")):
        with pytest.raises(TypeError) as info:
            checkpoint.save(path, state)
        assert f"state holds an object of {name} at {where}, which checkpoint.load refuses" in str(info.value)
        assert not path.exists() and not marker.exists()
    with torch.serialization.safe_globals([Allowed]):
        checkpoint.save(path, {"a": Allowed()})
        with pytest.raises(TypeError, match=r"numpy.float64 at state\['b'\]\[0\], which"):
            checkpoint.save(path, {"a": Allowed(), "b": [np.float64(1)]})
    # a container holding itself (pickle takes it) is walked once: the refused object is named, no RecursionError
    loop = [1.0]
    loop.append(loop)
    loop.append(np.float64(2))
    with pytest.raises(TypeError, match=r"numpy.float64 at state\['history'\]\[2\], which"):
        checkpoint.save(path, {"history": loop})


def test_save_checks_its_payload_without_copying_the_tensors_back(tmp_path, monkeypatch):
    """save read the whole payload back onto the CPU (a second copy of
    every tensor, ~3% of a large save's time) to check that load takes it:
    the check now reads it onto the meta device (the same data-only
    unpickler, no tensor bytes copied); a tensor the meta device cannot
    rebuild (a quantized one) is read back as before, and saves."""
    import warnings

    calls = []
    load = torch.load
    monkeypatch.setattr(torch, "load", lambda *a, **k: calls.append(k.get("map_location")) or load(*a, **k))
    state = {"model": {"w": torch.randn(64, 64)}, "rng": torch.get_rng_state()}
    checkpoint.save(tmp_path / "c.pt", state)
    assert calls == ["meta"]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # (quantized tensors and the storages they load through are deprecated)
        q = torch.quantize_per_tensor(torch.randn(8), 0.1, 0, torch.qint8)
        calls.clear()
        checkpoint.save(tmp_path / "q.pt", {"q": q})
        assert calls == ["meta", "cpu"]
        assert torch.equal(checkpoint.load(tmp_path / "q.pt")["q"].int_repr(), q.int_repr())


def test_save_names_a_missing_folder_or_a_folder_given_as_the_file(tmp_path):
    """save into a folder that does not exist, or to a path that is a
    folder, failed renaming or opening its hidden temporary file
    (FileNotFoundError / IsADirectoryError naming ".c.pt.tmp-PID-HEX"): the
    error names the folder or the path, and nothing is left behind."""
    with pytest.raises(FileNotFoundError, match=r"no folder .*missing to write the checkpoint c\.pt in"):
        checkpoint.save(tmp_path / "missing" / "c.pt", {"a": 1})
    (tmp_path / "run").mkdir()
    with pytest.raises(ValueError, match=r"run is a folder; give the checkpoint file to write"):
        checkpoint.save(tmp_path / "run", {"a": 1})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run"] and not any((tmp_path / "run").iterdir())


@pytest.mark.parametrize("wrapped", [False, True])
def test_pickled_code_is_refused_and_never_runs(tmp_path, wrapped):
    marker = tmp_path / "ran"
    path = tmp_path / "evil.pt"
    state = {"model": {}, "config": {}, "x": Payload(str(marker))}
    if wrapped:  # a payload inside a well-formed envelope with a correct digest
        import hashlib
        import io
        buf = io.BytesIO()
        torch.save(state, buf)
        data = buf.getvalue()
        torch.save({"format": checkpoint.FORMAT, "sha256": hashlib.sha256(data).hexdigest(), "payload": data}, path)
    else:
        torch.save(state, path)
    with pytest.raises(ValueError, match="evil.pt.*data only"):
        tr.load_checkpoint(path)
    assert not marker.exists()
    with open(path, "wb") as f:  # a plain pickle, not even a torch zip
        pickle.dump(Payload(str(marker)), f)
    with pytest.raises(ValueError, match="evil.pt"):
        checkpoint.load(path)
    assert not marker.exists()


def test_flipped_bytes_truncation_and_garbage_name_the_file(tmp_path):
    path = tmp_path / "ck.pt"
    checkpoint.save(path, {"model": {"w": torch.arange(5000.0)}, "config": {}})
    good = path.read_bytes()
    # 64 flipped bytes in the middle of the tensor data: the digest catches it.
    flipped = bytearray(good)
    mid = len(good) // 2
    for i in range(mid, mid + 64):
        flipped[i] ^= 0xFF
    path.write_bytes(bytes(flipped))
    with pytest.raises(ValueError, match="ck.pt"):
        checkpoint.load(path)
    for bad in (good[: len(good) // 3], b"", b"\x00" * 100, b"PK\x03\x04garbage" * 10):
        path.write_bytes(bad)
        with pytest.raises(ValueError, match="ck.pt"):
            checkpoint.load(path)


def test_a_file_that_is_no_pickle_is_not_said_to_hold_python_objects(tmp_path):
    """A text, JSON or binary file given as a checkpoint was refused as one
    that "holds Python objects other than tensors and plain data" (torch's
    weights-only reader says "Unsupported operand" for a byte that starts no
    pickle opcode): it is "damaged or not a torch file", naming it. Pickled
    objects are still refused as such."""
    path = tmp_path / "ck.pt"
    for data in (b"import torch\nprint(1)\n", b'{"model": {}, "config": {}}', b"\x00\x01\x02garbage" * 8):
        path.write_bytes(data)
        with pytest.raises(ValueError, match=r"ck\.pt: the checkpoint is damaged or not a torch file") as info:
            checkpoint.load(path)
        assert "Python objects" not in str(info.value) and "weights_only` set to `False" not in str(info.value)
    torch.save({"model": {}, "x": Path("data")}, path)
    with pytest.raises(ValueError, match=r"ck\.pt: the checkpoint holds Python objects"):
        checkpoint.load(path)


def test_every_single_byte_flip_is_refused_or_harmless(tmp_path):
    """No flipped byte ever gives back different data silently."""
    path = tmp_path / "ck.pt"
    state = {"model": {"w": torch.arange(64.0)}, "config": {"k": 1}}
    checkpoint.save(path, state)
    good = path.read_bytes()
    for i in range(0, len(good), max(1, len(good) // 300)):
        flipped = bytearray(good)
        flipped[i] ^= 0x5A
        path.write_bytes(bytes(flipped))
        try:
            back = checkpoint.load(path)
        except ValueError as exc:
            assert "ck.pt" in str(exc)
            continue
        assert torch.equal(back["model"]["w"], state["model"]["w"]) and back["config"] == state["config"], i


def test_legacy_plain_checkpoint_still_loads(tmp_path):
    torch.save({"model": {"w": torch.ones(2)}, "config": {"classes": ["a"]}}, tmp_path / "old.pt")
    assert torch.equal(tr.load_checkpoint(tmp_path / "old.pt")["model"]["w"], torch.ones(2))


def test_atomic_write_uses_a_private_temp_name(tmp_path, monkeypatch):
    seen = []
    real_replace = os.replace

    def spy(src, dst):
        seen.append(Path(src).name)
        real_replace(src, dst)

    monkeypatch.setattr(os, "replace", spy)
    checkpoint.save(tmp_path / "a.pt", {"x": 1})
    checkpoint.save(tmp_path / "a.pt", {"x": 2})
    assert len(set(seen)) == 2 and all(str(os.getpid()) in name for name in seen)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.pt"]


def test_a_killed_writers_temporary_file_is_removed_by_the_next_write(tmp_path):
    """A write killed by SIGKILL (a --nproc worker that torch's spawn ended mid-checkpoint) runs no clean-up: its
    temporary file, as large as a checkpoint, stayed beside the run after any later save. The next write of the
    same file removes those of dead processes not written for ten minutes; a live process's (a writer now), a
    fresh one's and another file's stay."""
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                          text=True, timeout=60)
    pid = int(dead.stdout)
    old = time.time() - 1200  # (past _LEFT_AFTER_S, ten minutes)
    left = tmp_path / f".checkpoint.pt.tmp-{pid}-0a1b2c3d"
    fresh = tmp_path / f".checkpoint.pt.tmp-{pid}-99999999"
    live = tmp_path / f".checkpoint.pt.tmp-{os.getpid()}-0a1b2c3d"
    other = tmp_path / f".best.pt.tmp-{pid}-0a1b2c3d"
    for path in (left, fresh, live, other):
        path.write_bytes(b"x" * 100)
        if path is not fresh:
            os.utime(path, (old, old))
    checkpoint.save(tmp_path / "checkpoint.pt", {"x": 1})
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        ["checkpoint.pt", fresh.name, live.name, other.name])


def test_second_run_on_the_same_out_is_refused(tmp_path):
    out = tmp_path / "run"
    with checkpoint.DirectoryLock(out):
        with pytest.raises(ValueError, match="in use by another run"):
            tr.train(_parse([*TINY, "--epochs", "1", "--out", str(out)]))
        # Another process is refused too (flock is per open file, not per process).
        code = ("import sys; from pointsparse import checkpoint\n"
                "try:\n    checkpoint.DirectoryLock(sys.argv[1]).__enter__()\n"
                "except ValueError as e:\n    print(e); sys.exit(3)\n")
        env = dict(os.environ, PYTHONPATH=str(ROOT))
        r = subprocess.run([sys.executable, "-c", code, str(out)], capture_output=True, text=True, env=env, timeout=60)
        assert r.returncode == 3 and "in use" in r.stdout
    with checkpoint.DirectoryLock(out):  # released: taken again
        pass


def test_a_run_that_fails_leaves_no_lock_behind(tmp_path):
    # --resume of a checkpoint that does not exist: refused before training, and the --out it made
    # goes with its .lock (it used to stay behind, empty but for the lock).
    out = tmp_path / "run"
    with pytest.raises(ValueError, match="does not exist"):
        tr.train(_parse([*TINY, "--epochs", "1", "--out", str(out), "--resume", str(tmp_path / "none.pt")]))
    assert not out.exists()
    # An --out that existed stays, with what was there, and without a lock the run made.
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    with pytest.raises(ValueError, match="does not exist"):
        tr.train(_parse([*TINY, "--epochs", "1", "--out", str(out), "--init", str(tmp_path / "none.pt")]))
    assert sorted(p.name for p in out.iterdir()) == ["notes.txt"]
    # A lock that was there before the run (an earlier run's) stays; so does one of a run that ended well.
    with checkpoint.DirectoryLock(out):
        pass
    with pytest.raises(ValueError, match="does not exist"):
        tr.train(_parse([*TINY, "--epochs", "1", "--out", str(out), "--init", str(tmp_path / "none.pt")]))
    assert sorted(p.name for p in out.iterdir()) == [".lock", "notes.txt"]
    # A directory made by a run that failed after writing into it stays.
    out2 = tmp_path / "run2"
    with pytest.raises(RuntimeError, match="late"):
        with checkpoint.DirectoryLock(out2):
            (out2 / "part.txt").write_text("x")
            raise RuntimeError("late")
    assert sorted(p.name for p in out2.iterdir()) == ["part.txt"]


def test_diverged_training_stops_with_an_error_and_keeps_only_finite_checkpoints(tmp_path):
    out = tmp_path / "run"
    with pytest.raises(tr.TrainingDiverged, match="diverged"):
        tr.train(_parse([*TINY, "--epochs", "3", "--lr", "1e30", "--out", str(out)]))
    if (out / "checkpoint.pt").exists():  # written before it diverged: finite, and not the last epoch
        state = tr.load_checkpoint(out / "checkpoint.pt")
        assert state["epoch"] < 3
        assert all(bool(torch.isfinite(v).all()) for v in state["model"].values() if v.is_floating_point())
    assert not (out / "metrics.json").exists()
    for flag, value in (("--lr", "inf"), ("--max-range", "1e30"), ("--voxel-size", "nan")):
        with pytest.raises(ValueError, match=flag):
            tr.main(_parse([*TINY, "--epochs", "1", flag, value, "--out", str(out)]))


def test_sigkill_mid_epoch_then_resume_matches_an_uninterrupted_run(tmp_path):
    import signal
    import time

    args = [*TINY, "--scenes", "6", "--batch-size", "1", "--epochs", "3"]
    env = dict(os.environ, PYTHONPATH=str(ROOT), POINTSPARSE_NUM_THREADS="1", OMP_NUM_THREADS="1")
    run = lambda out, *extra: subprocess.run(  # noqa: E731
        [sys.executable, "-m", "pointsparse.app.train", *args, "--threads", "1", "--out", str(out), *extra],
        env=env, capture_output=True, text=True, timeout=600)
    straight = run(tmp_path / "straight")
    assert straight.returncode == 0, straight.stderr[-2000:]
    cut = tmp_path / "cut"
    proc = subprocess.Popen([sys.executable, "-m", "pointsparse.app.train", *args, "--threads", "1", "--out", str(cut)],
                            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None:
        if (cut / "checkpoint.pt").exists():
            try:
                if tr.load_checkpoint(cut / "checkpoint.pt")["epoch"] >= 1:
                    break
            except ValueError:
                pass
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    first = tr.load_checkpoint(cut / "checkpoint.pt")
    assert first["epoch"] < 3, "the run finished before it could be killed"
    resumed = run(cut, "--resume")
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    a, b = tr.load_checkpoint(tmp_path / "straight" / "checkpoint.pt"), tr.load_checkpoint(cut / "checkpoint.pt")
    assert b["epoch"] == 3
    for name in a["model"]:
        assert torch.equal(a["model"][name], b["model"][name]), name
    assert a["history"]["step_loss"] == b["history"]["step_loss"]


def test_crafted_checkpoints_are_refused_naming_the_file(tmp_path):
    """load_model on a checkpoint whose config or weights do not make a
    model: a ValueError / TypeError that names the file and the problem, at
    once (a config asking for a million residual blocks built for ever;
    missing keys gave KeyError, weights that do not fit torch's RuntimeError);
    the untouched checkpoint loads."""
    from pointsparse.models import MinkUNet, load_model

    config = {"model": "minkunet", "in_channels": 4, "classes": ["a", "b", "c"], "cr": 0.125, "blocks": 1}
    weights = MinkUNet(4, 3, cr=0.125, blocks=1).state_dict()
    good = tmp_path / "good.pt"
    checkpoint.save(good, {"config": config, "model": weights})
    assert isinstance(load_model(good), MinkUNet)
    first = next(iter(weights))
    crafted = {
        "blocks_huge": ({**config, "blocks": 10**6}, weights, ValueError, "blocks must be at most 64"),
        "no_classes": ({k: v for k, v in config.items() if k != "classes"}, weights, ValueError, "lacks 'classes'"),
        "classes_int": ({**config, "classes": 5}, weights, TypeError, "classes must be a list"),
        # (eval said the data's classes differ from the checkpoint's [], export that num_classes must be positive)
        "classes_empty": ({**config, "classes": []}, weights, ValueError, "classes must be a non-empty list"),
        "widths_list": ({**config, "widths": [1, 2]}, weights, TypeError, "widths must be a dict"),
        "voxel_str": ({**config, "voxel_size": "abc"}, weights, TypeError, "voxel_size must be a finite number"),
        "cr_negative": ({**config, "cr": -1.0}, weights, ValueError, "cr must be a finite number > 0"),
        "ignore_float": ({**config, "ignore_index": 2.5}, weights, TypeError, "ignore_index must be an int"),
        "weights_empty": (config, {}, ValueError, "do not fit the model"),
        "weights_list": (config, [1, 2], ValueError, "'model' dict"),
        "extra_key": (config, {**weights, "bogus.weight": torch.zeros(3)}, ValueError, "do not fit"),
        "wrong_shape": (config, {**weights, first: torch.zeros(3, 3)}, ValueError, first.split(".")[0]),
        # (a bias or mask key of a module the model lacks was an AttributeError; a bias of another
        # shape on a conv built without one, or any on a ReLU, loaded)
        "extra_bias": (config, {**weights, "bogus.bias": torch.zeros(3)}, ValueError, "do not fit"),
        "other_model": (config, {f"unet.{k}": v for k, v in weights.items()}, ValueError, "do not fit"),
        "extra_mask": (config, {**weights, "bogus.weight_orig": torch.zeros(3), "bogus.weight_mask": torch.ones(3)},
                       ValueError, "do not fit"),
        "bias_shape": (config, {**weights, "stem.0.0.bias": torch.zeros(3, 3)}, ValueError, "'stem.0.0.bias'"),
        "relu_bias": (config, {**weights, "stem.0.2.bias": torch.zeros(2)}, ValueError, "do not fit"),
        # (a value that is no tensor, or a key that is no name, was an AttributeError)
        "weight_list": (config, {**weights, first: [1, 2]}, ValueError, f"'{first}' holds list"),
        "bias_none": (config, {**weights, "stem.0.0.bias": None}, ValueError, "'stem.0.0.bias' holds NoneType"),
        "key_int": (config, {**weights, 5: torch.zeros(1)}, ValueError, "map names to tensors"),
        "mask_no_tensor": (config, {**weights, "stem.0.0.nope_orig": torch.zeros(3),
                                    "stem.0.0.nope_mask": torch.ones(3)}, ValueError, "nope_orig"),
    }
    for name, (cfg, w, error, match) in crafted.items():
        path = tmp_path / f"{name}.pt"
        checkpoint.save(path, {"config": cfg, "model": w})
        with pytest.raises(error, match=match) as info:
            load_model(path)
        assert str(path) in str(info.value), name


def test_a_training_checkpoints_record_of_the_run_of_the_wrong_kind_is_refused_naming_the_file(tmp_path):
    """A training checkpoint's record of its run, which eval, prune and
    --resume read for the run's data (``args``: its flags, ``val_paths``:
    the clouds it validated on), was used as it came: one of another kind
    (a hand-edited file, another tool's) was an AttributeError ('list'
    object has no attribute 'get'), "'int' object is not iterable" or the
    reader's TypeError about specs, naming no file. load_training refuses
    each with a ValueError naming the file and the entry."""
    from pointsparse.app import evaluate
    from pointsparse.models import MinkUNet

    config = {"model": "minkunet", "in_channels": 4, "classes": ["a", "b", "c"], "cr": 0.125, "blocks": 1}
    state = {"config": config, "model": MinkUNet(4, 3, cr=0.125, blocks=1).state_dict(),
             "args": {"data": ["generated"], "val_data": None}, "val_paths": []}
    good = tmp_path / "good.pt"
    checkpoint.save(good, state)
    assert checkpoint.load_training(good)["args"]["data"] == ["generated"]
    crafted = {
        "args_list": (dict(state, args=[1]), r"its args must be a dict"),
        "args_key_int": (dict(state, args={1: 2}), r"its args must be a dict"),
        "val_paths_int": (dict(state, val_paths=3), r"its val_paths must be a list of file paths"),
        "val_paths_ints": (dict(state, val_paths=[1, 2]), r"its val_paths must be a list of file paths"),
        "data_int": (dict(state, args={"data": 3}), r"its args' data must be a list of .*; got 3"),
        "val_data_str": (dict(state, args={"val_data": "a.npz"}), r"its args' val_data must be a list"),
    }
    for name, (bad, match) in crafted.items():
        path = tmp_path / f"{name}.pt"
        checkpoint.save(path, bad)
        with pytest.raises(ValueError, match=match) as info:
            checkpoint.load_training(path)
        assert str(path) in str(info.value), name
        with pytest.raises(ValueError, match=match):
            evaluate.main(argparse.Namespace(checkpoint=str(path), program=None, data=None, label_map=None,
                                             ignore_index=None, batch_size=1, threads=None, device="cpu",
                                             no_progress=True, out=None, val_scenes=None, inference="float32",
                                             maps_ahead=False, skip_nonfinite=False))
    # None for args or val_paths is no record, as the readers of them take it (eval's own default data was an
    # AttributeError on None)
    for name, none in {"args": dict(state, args=None), "val_paths": dict(state, val_paths=None)}.items():
        path = tmp_path / f"{name}_none.pt"
        checkpoint.save(path, none)
        loaded = checkpoint.load_training(path)
        spec, _ = evaluate.eval_source(argparse.Namespace(data=None, val_scenes=None, label_map=None,
                                                          skip_nonfinite=False), loaded, 255)
        assert spec == (["generated"] if name == "args" else state["args"]["data"]), name


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_library_loaders_refuse_weights_that_hold_nan_or_inf(tmp_path, bad):
    """A checkpoint whose weights (or BatchNorm statistics) hold NaN or inf
    (a diverged run's, a damaged file's) loaded silently through
    models.load_model and export.load_checkpoint, a model whose every output
    is NaN, where the commands refuse to run it. Both refuse it now, naming
    the file and the tensor as the commands do; allow_non_finite=True loads
    it as it is (to inspect it)."""
    from pointsparse import export
    from pointsparse.models import MinkUNet, load_model

    config = {"model": "minkunet", "in_channels": 4, "classes": ["a", "b", "c"], "cr": 0.125, "blocks": 1}
    for name in ("stem.0.0.weight", "stem.0.1.running_var"):
        weights = MinkUNet(4, 3, cr=0.125, blocks=1).state_dict()
        weights[name].view(-1)[1] = bad
        path = tmp_path / f"{name}.pt"
        checkpoint.save(path, {"config": config, "model": weights})
        for load in (load_model, export.load_checkpoint):
            with pytest.raises(ValueError, match=rf"checkpoint .*{name}.pt: {name} holds NaN or inf: the weights of a "
                                                 r"diverged run or a damaged file; .*allow_non_finite=True"):
                load(path)
        loaded = load_model(path, allow_non_finite=True)
        torch.testing.assert_close(loaded.state_dict()[name], weights[name], rtol=0, atol=0, equal_nan=True)
        assert not loaded.training and export.load_checkpoint(path, allow_non_finite=True)[1] == config
    for load in (load_model, export.load_checkpoint):
        with pytest.raises(TypeError, match="allow_non_finite must be True or False"):
            load(path, allow_non_finite="yes")


def test_library_loaders_refuse_a_negative_running_variance(tmp_path):
    """A BatchNorm's running_var below zero (finite: the NaN check passed it)
    loaded silently; every output was NaN, and predict wrote class 0 for
    every point with exit code 0. The loaders refuse it, naming the file and
    the tensor; allow_non_finite=True loads it to inspect it."""
    from pointsparse import export
    from pointsparse.models import MinkUNet, load_model

    config = {"model": "minkunet", "in_channels": 4, "classes": ["a", "b", "c"], "cr": 0.125, "blocks": 1}
    weights = MinkUNet(4, 3, cr=0.125, blocks=1).state_dict()
    name = "stem.0.1.running_var"
    weights[name].view(-1)[2] = -0.5
    path = tmp_path / "negative.pt"
    checkpoint.save(path, {"config": config, "model": weights})
    for load in (load_model, export.load_checkpoint):
        with pytest.raises(ValueError, match=rf"checkpoint .*negative.pt: {name} holds negative values, but a "
                                             r"running variance is >= 0: a damaged file; .*allow_non_finite=True"):
            load(path)
    assert load_model(path, allow_non_finite=True).state_dict()[name][2] == -0.5


def test_an_out_that_is_a_file_is_refused(tmp_path):
    """--out naming a file: a ValueError naming it (was FileExistsError from mkdir)."""
    path = tmp_path / "file.pt"
    path.write_bytes(b"x")
    with pytest.raises(ValueError, match="--out .*file.pt is a file"):
        with checkpoint.DirectoryLock(path):
            pass
    assert path.read_bytes() == b"x"


def test_an_out_that_cannot_be_written_is_refused(tmp_path, monkeypatch):
    """--out an existing folder this user may not write (read-only, another
    user's, a read-only file system): the lock file could not be opened, and
    the command ended in a traceback of PermissionError (OSError errors that
    the command line does not report in one line); now a ValueError naming
    --out and the folder. (Simulated: the tests may run as root, whom
    permissions do not stop.)"""
    out = tmp_path / "ro"
    out.mkdir()
    real = open

    def refuse(path, *args, **kwargs):
        if str(path).endswith(".lock"):
            raise PermissionError(13, "Permission denied", str(path))
        return real(path, *args, **kwargs)

    monkeypatch.setattr(checkpoint, "open", refuse, raising=False)
    with pytest.raises(ValueError, match=r"--out .*ro: cannot write in this directory \(PermissionError: "
                                         r"Permission denied\)"):
        with checkpoint.DirectoryLock(out):
            pass
    assert list(out.iterdir()) == []
    if os.geteuid() != 0:  # (the real thing, where permissions apply)
        monkeypatch.undo()
        out.chmod(0o555)
        try:
            with pytest.raises(ValueError, match="cannot write in this directory"):
                with checkpoint.DirectoryLock(out):
                    pass
        finally:
            out.chmod(0o755)


def test_resume_from_a_weights_only_checkpoint_is_refused(tmp_path, capsys):
    """train --resume on a checkpoint of weights and config only (what
    `prune channels` or a hand-made file holds, no optimizer or epoch): exit
    2 with a message naming --resume and what it lacks (was KeyError 'epoch')."""
    from pointsparse.app import cli
    from pointsparse.models import MinkUNet

    config = {"model": "minkunet", "in_channels": 4, "classes": [str(i) for i in range(19)], "cr": 0.125,
              "blocks": 1, "voxel_size": 0.5}
    path = tmp_path / "weights.pt"
    checkpoint.save(path, {"config": config, "model": MinkUNet(4, 19, cr=0.125, blocks=1).state_dict()})
    capsys.readouterr()
    assert cli.main(["train", *TINY, "--epochs", "1", "--resume", str(path), "--out", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err
    assert "--resume" in err and "lacks" in err and "epoch" in err, err


def test_load_names_a_folder_given_as_the_checkpoint(tmp_path):
    """checkpoint.load of a folder said it "does not exist"; it names the
    folder as one and the file to give."""
    with pytest.raises(ValueError, match=r"is a folder; give the checkpoint file in it"):
        checkpoint.load(tmp_path)
    with pytest.raises(ValueError, match="does not exist"):
        checkpoint.load(tmp_path / "missing.pt")


def test_an_exported_program_given_as_the_checkpoint_is_named_as_one(tmp_path):
    """A .pt2 program (pointsparse export's) where a checkpoint is read (eval --checkpoint for --program, say)
    was said to be "damaged, truncated or not a torch file", with torch's miniz error about data.pkl; it is
    named as a program, and where to give it."""
    from pointsparse import SparseTensor, export
    from pointsparse import nn as spnn

    model = spnn.Conv3d(2, 3, 3).eval()
    x = SparseTensor(torch.randn(5, 2), torch.tensor([[0, i, 0, 0] for i in range(5)], dtype=torch.int32))
    export.save(export.export_model(model, x), tmp_path / "m.pt2")
    with pytest.raises(ValueError, match=r"m\.pt2 is an exported program \(pointsparse export's \.pt2\), not a "
                                         r"checkpoint.*--program"):
        checkpoint.load(tmp_path / "m.pt2")
    with pytest.raises(ValueError, match=r"m\.pt2 is an exported program"):
        export.load_checkpoint(tmp_path / "m.pt2")


def test_non_finite_weight_reads_compressed_layers():
    """``non_finite_weight`` (the check training, the loaders and the commands
    share) raised AttributeError on a model holding compressed layers, whose
    state holds their formats as dicts (``_extra_state``): it now looks into
    them, naming the layer's state where a format's values hold NaN or inf,
    and None for a clean one."""
    from pointsparse import formats
    from pointsparse import nn as spnn
    from pointsparse.models.loading import non_finite_weight

    torch.manual_seed(0)
    for fmt in ("csr", "fkw", "bsr"):
        model = torch.nn.Sequential(spnn.Conv3d(4, 8, 3), spnn.BatchNorm(8), spnn.Conv3d(8, 3, 1)).eval()
        assert non_finite_weight(formats.compress(model, fmt)) is None
        with torch.no_grad():
            model[2].weight[0, 1, 2] = float("nan")
        assert non_finite_weight(formats.compress(model, fmt)) == "2._extra_state", fmt


def test_a_compressed_models_weights_are_named_as_such(tmp_path):
    """A compressed model's state_dict (formats.compress: each layer's format
    under ``_extra_state``, a dict) saved as a checkpoint's ``model`` was
    refused by load_model as no state_dict at all ("the weights must map
    names to tensors; 'stem.0.0._extra_state' holds dict"); it is named as a
    compressed model's now, with what to do (load the uncompressed weights,
    compress the model load_model returns)."""
    from pointsparse import formats
    from pointsparse.models import MinkUNet, load_model, model_from_state

    config = {"model": "minkunet", "in_channels": 4, "classes": ["a", "b", "c"], "cr": 0.125, "blocks": 1}
    model = MinkUNet(4, 3, cr=0.125, blocks=1).eval()
    for fmt in ("csr", "fkw"):
        path = tmp_path / f"{fmt}.pt"
        checkpoint.save(path, {"config": config, "model": formats.compress(model, fmt).state_dict()})
        with pytest.raises(ValueError, match=rf"checkpoint .*{fmt}\.pt: the weights are a compressed model's "
                                             r"\(formats\.compress\): 'stem\.0\.0\._extra_state' holds a sparse "
                                             r"format.*compress the model load_model returns"):
            load_model(path)
    with pytest.raises(ValueError, match="compressed model's"):  # (a SparseLinear's: SPVCNN's classifier)
        model_from_state({"config": dict(config, model="spvcnn"),
                          "model": formats.compress(torch.nn.Linear(3, 2), "csr").state_dict()})


def test_a_key_that_is_no_name_is_named_as_such(tmp_path):
    """A state_dict key that is no str (5) was said to hold "Tensor", as if the
    value were the problem; the key is named as no name now."""
    from pointsparse.models import MinkUNet, load_model

    config = {"model": "minkunet", "in_channels": 4, "classes": ["a", "b", "c"], "cr": 0.125, "blocks": 1}
    weights = MinkUNet(4, 3, cr=0.125, blocks=1).state_dict()
    path = tmp_path / "key.pt"
    checkpoint.save(path, {"config": config, "model": {**weights, 5: torch.zeros(1)}})
    with pytest.raises(ValueError, match=r"key\.pt: the weights must map names to tensors \(a state_dict\); key 5 of "
                                         r"type int is not a name \(str\)"):
        load_model(path)


def test_save_and_load_name_a_path_that_is_no_path(tmp_path):
    """checkpoint.save / load given no path (None, an open buffer, bytes) failed
    inside pathlib ("expected str, bytes or os.PathLike object, not NoneType",
    "argument should be a str object ... not <class 'bytes'>"), naming no
    argument; a TypeError names path and what it takes now."""
    import io

    for bad, kind in ((None, "NoneType"), (io.BytesIO(), "BytesIO"), (b"c.pt", "bytes"), (3, "int")):
        with pytest.raises(TypeError, match=rf"path must be the checkpoint file's path \(a str or Path\); got {kind}"):
            checkpoint.save(bad, {"a": 1})
        with pytest.raises(TypeError, match=rf"path must be the checkpoint file's path \(a str or Path\); got {kind}"):
            checkpoint.load(bad)
    checkpoint.save(str(tmp_path / "c.pt"), {"a": 1})
    assert checkpoint.load(str(tmp_path / "c.pt")) == {"a": 1}


def test_save_names_where_the_state_holds_what_cannot_be_pickled(tmp_path):
    """An object pickle cannot take at all (a lambda, a lock, a generator:
    a logger or a closure left in the state) made save fail inside pickle
    with its own AttributeError / TypeError ("Can't pickle local object",
    "cannot pickle '_thread.lock' object"), naming no place in the state. It
    is the TypeError naming the object's type and place that save gives for
    what load refuses, and nothing is written."""
    import threading

    path = tmp_path / "c.pt"
    for value, name in ((lambda: 1, "function"), (threading.Lock(), "lock"), ((i for i in ()), "generator")):
        with pytest.raises(TypeError, match=rf"state holds an object of \S*{name} at state\['log'\]\[1\], which "
                                            "checkpoint.load refuses"):
            checkpoint.save(path, {"model": {"w": torch.zeros(2)}, "log": [0.5, value]})
        assert list(tmp_path.iterdir()) == []


def test_save_refuses_a_path_that_names_a_folder_by_its_slash(tmp_path):
    """save("runs/exp1/", ...) (a folder, by its trailing slash, not made
    yet) wrote the checkpoint as a file named exp1, since pathlib drops the
    slash (torch.save refuses it: IsADirectoryError); a later run making
    runs/exp1 then failed. It is the ValueError save gives for a folder, and
    nothing is written."""
    for given in (f"{tmp_path}/exp1/", f"{tmp_path}/exp1{os.sep}"):
        with pytest.raises(ValueError, match=r"exp1/ is a folder \(it ends with a slash\); give the checkpoint file"):
            checkpoint.save(given, {"a": 1})
        assert list(tmp_path.iterdir()) == []


def test_tensors_without_values_are_refused_when_saved_and_when_loaded(tmp_path):
    """A model built on the meta device (torch.device("meta"), to_empty not
    yet run) has tensors of shapes only: save wrote its state_dict without
    a word, a checkpoint holding no weights, and load_model then failed with
    torch's "Cannot copy out of meta tensor; no data!" once per tensor. save
    refuses it naming the place (nothing written), and weights that hold
    one anyway (a file written before) are named by the loader."""
    from pointsparse.models import MinkUNet, model_from_state

    config = {"model": "minkunet", "in_channels": 4, "classes": ["a", "b", "c"], "cr": 0.125, "blocks": 1}
    with torch.device("meta"):
        weights = MinkUNet(4, 3, cr=0.125, blocks=1).state_dict()
    with pytest.raises(ValueError, match=r"state\['model'\]\['stem\.0\.0\.weight'\] is a tensor on the meta device "
                                         r"\(a shape, no values\)"):
        checkpoint.save(tmp_path / "c.pt", {"config": config, "model": weights})
    assert list(tmp_path.iterdir()) == []
    with pytest.raises(ValueError, match=r"'stem\.0\.0\.weight' is a tensor on the meta device \(a shape, no "
                                         r"values\)"):
        model_from_state({"config": config, "model": weights})


def _nested(depth: int, kind: str):
    """A list (or dict) holding one holding one ... ``depth`` levels deep."""
    top = [] if kind == "list" else {}
    inner = top
    for _ in range(depth):
        child = [] if kind == "list" else {}
        inner.append(child) if kind == "list" else inner.update(a=child)
        inner = child
    return top


@pytest.mark.parametrize("kind", ["list", "dict"])
def test_save_names_a_state_nested_too_deep(tmp_path, kind):
    """A state of containers nested some hundreds of levels deep or more
    (a linked list of dicts, a tree built by recursion) made save raise
    Python's RecursionError from its own walk of the state (or pickle's),
    naming nothing. It is a ValueError saying how deep the state nests and
    the most a checkpoint takes, and nothing is written; a state nested as
    deep as a checkpoint's (an optimizer's state in a dict) saves as before."""
    path = tmp_path / "c.pt"
    for depth in (checkpoint.MAX_NESTING + 1, 1000, 100_000):
        with pytest.raises(ValueError, match=rf"state nests containers more than {checkpoint.MAX_NESTING} levels "
                                             r"deep \(at state\["):
            checkpoint.save(path, {"log": _nested(depth, kind)})
        assert list(tmp_path.iterdir()) == []
    state = {"log": _nested(checkpoint.MAX_NESTING - 1, kind)}
    checkpoint.save(path, state)
    assert checkpoint.load(path) == state


def test_a_flipped_byte_in_a_plain_torch_save_file_is_refused(tmp_path):
    """A file written by torch.save (a state_dict saved by hand, a checkpoint
    from before the envelope) has no digest, and torch.load does not check
    the CRC-32 the zip format keeps of each record: a byte flipped in a
    tensor's data loaded as another weight, silently. load checks the
    records' CRC-32 and names the file and the record; the file whole
    still loads."""
    path = tmp_path / "plain.pt"
    weight = torch.full((64,), 1234.5)
    torch.save({"model": {"w": weight}, "config": {}}, path)
    good = path.read_bytes()
    assert torch.equal(checkpoint.load(path)["model"]["w"], weight)
    at = good.find(weight.numpy().tobytes())
    assert at > 0
    flipped = bytearray(good)
    flipped[at + 100] ^= 0x01
    path.write_bytes(bytes(flipped))
    with pytest.raises(ValueError, match=r"plain\.pt: the checkpoint is corrupted \(the CRC-32 of its record "
                                         r"\S*data/0 does not match"):
        checkpoint.load(path)


def test_a_long_file_name_that_the_file_system_takes_is_written(tmp_path):
    """A checkpoint name of 240 to 255 bytes (one the file system takes)
    failed with OSError 'File name too long' naming a hidden temporary file:
    atomic_write's temporary name is the target's plus a dot and a suffix.
    The temporary name is cut to fit; the file is written under the name
    given, and no temporary file is left."""
    for name in ("c" * 252 + ".pt", "é" * 120 + ".pt"):  # (255 bytes; 243 bytes in UTF-8)
        path = tmp_path / name
        checkpoint.save(path, {"a": 1})
        assert checkpoint.load(path) == {"a": 1}
        assert [p.name for p in tmp_path.iterdir()] == [name]
        path.unlink()


def test_load_names_a_path_that_is_no_regular_file(tmp_path):
    """A path that exists but is no regular file (a named pipe, a device
    such as /dev/null) was said not to exist. It is named as what it is not,
    and never opened (a pipe would block the read)."""
    pipe = tmp_path / "pipe.pt"
    os.mkfifo(pipe)
    with pytest.raises(ValueError, match=r"checkpoint \S*pipe\.pt is not a regular file"):
        checkpoint.load(pipe)
    with pytest.raises(ValueError, match=r"checkpoint \S*missing\.pt does not exist"):
        checkpoint.load(tmp_path / "missing.pt")


class _FillsUp(io.RawIOBase):
    """A file that takes 4 KiB, then raises ``error`` on a write (a full
    disk's OSError, or a Ctrl-C arriving mid-write)."""

    def __init__(self, f, error):
        self.f, self.written, self.error = f, 0, error

    def writable(self):
        return True

    def write(self, data):
        self.written += len(data)
        if self.written > 4096:
            raise self.error
        return self.f.write(data)


@pytest.mark.parametrize("error", ["full", "interrupt"])
def test_a_write_cut_short_names_its_cause_and_leaves_nothing(tmp_path, error):
    """torch.save cut short (a full disk, a Ctrl-C) raised torch's own
    "unexpected pos 64 vs 0" RuntimeError from its writer's exit, the cause
    above it: a Ctrl-C while a checkpoint was written was a traceback of
    exit status 1, not train's one line and 130, and a full disk's error
    was 50 lines up. The write now raises the Ctrl-C itself, or an OSError
    naming the file it was writing; its temporary file is removed and the
    file written before stays."""
    import errno

    from pointsparse.checkpoint import atomic_write

    path = tmp_path / "c.pt"
    path.write_bytes(b"the epoch before")
    cause = OSError(errno.ENOSPC, "No space left on device") if error == "full" else KeyboardInterrupt()
    big = {"w": torch.randn(100_000)}
    with pytest.raises(OSError if error == "full" else KeyboardInterrupt) as info:
        atomic_write(path, lambda f: torch.save(big, _FillsUp(f, cause)))
    if error == "full":
        assert info.value.filename == str(path) and info.value.errno == errno.ENOSPC
        from pointsparse.app.cli import _message
        assert _message(info.value) == f"{path}: No space left on device (writing it)"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c.pt"] and path.read_bytes() == b"the epoch before"


def test_a_damaged_files_cause_is_cut_at_a_sentence_not_mid_word():
    """torch's reason for a file cut short was cut at 200 characters: "...
    If you are seeing this error, there is a high likelihood that your
    checkpoint file is)". The message keeps its first line up to the last
    sentence's end within the limit (else a word's, marked ...)."""
    from pointsparse._ext import brief

    torch_says = ("PytorchStreamReader failed reading zip archive: failed finding central directory. If you are "
                  "seeing this error, there is a high likelihood that your checkpoint file is corrupted. This can "
                  "happen if the file was not saved properly.\nmore detail")
    assert brief(RuntimeError(torch_says)) == ("RuntimeError: PytorchStreamReader failed reading zip archive: failed "
                                               "finding central directory. If you are seeing this error, there is a "
                                               "high likelihood that your checkpoint file is corrupted.")
    assert brief(ValueError("word " * 60)) == "ValueError: " + ("word " * 40).strip() + " ..."
    assert brief(OSError("short")) == "OSError: short" and brief(KeyError()) == "KeyError"
    # no break late enough (a long path, an early sentence): cut at the limit, not down to a word or two
    assert brief(ValueError("x" * 500)) == "ValueError: " + "x" * 200 + " ..."
    assert brief(RuntimeError("/" + "a" * 300 + " is missing")) == "RuntimeError: /" + "a" * 199 + " ..."
    assert brief(ValueError("Error. " + "d" * 300)) == "ValueError: Error. " + "d" * 193 + " ..."


@pytest.mark.parametrize("outside", ["disk", "interrupt"])
def test_a_write_called_while_handling_an_error_keeps_its_own_error(tmp_path, outside):
    """A write inside the caller's ``except`` (a save on error) whose own
    failure is a TypeError came out as the caller's OSError ("Input/output
    error (writing it)") or as a bare KeyboardInterrupt: the chain the
    write reads stops at what the caller was handling."""
    import errno

    from pointsparse.checkpoint import atomic_write

    def bad(f):
        raise TypeError("not data")

    with pytest.raises(TypeError, match="not data"):
        try:
            raise OSError(errno.EIO, "Input/output error") if outside == "disk" else KeyboardInterrupt()
        except (OSError, KeyboardInterrupt):
            atomic_write(tmp_path / "x.pt", bad)
    assert list(tmp_path.iterdir()) == []
