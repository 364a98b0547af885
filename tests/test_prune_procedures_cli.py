"""``pointsparse prune <procedure>``: registered, parses, runs quick."""

from __future__ import annotations

import pytest

from pointsparse.app import cli

pytestmark = pytest.mark.usefixtures("one_thread")


def test_registered_and_parses():
    parser = cli.build_parser()
    args = parser.parse_args(["prune", "amc", "--flops", "0.4", "--reward", "error", "--quick"])
    assert args.procedure == "amc" and args.flops == 0.4 and args.quick
    with pytest.raises(SystemExit):
        parser.parse_args(["prune", "magic"])


@pytest.mark.parametrize("procedure", ["sensitivity", "amc"])
def test_quick_runs_on_digits(procedure, tmp_path, capsys):
    pytest.importorskip("sklearn")
    assert cli.main(["prune", procedure, "--quick", "--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "dense accuracy" in out
    assert (tmp_path / ("sensitivity.png" if procedure == "sensitivity" else "amc_ratios.json")).exists()


@pytest.mark.parametrize("flag,value", [("--finetune-lr-factor", "nan"), ("--threshold", "nan"), ("--sparsity", "1.5"),
                                        ("--sparsity", "inf"), ("--flops", "0"), ("--latency", "-1"),
                                        ("--prune-fraction", "nan"), ("--rounds", "0"), ("--episodes", "-3"),
                                        ("--rewind", "-1")])
def test_bad_flags_fail_before_any_work(flag, value, tmp_path, capsys, monkeypatch):
    """The command line prints the message naming the flag and returns 2, no
    traceback; POINTSPARSE_TRACEBACK=1 raises the ValueError itself."""
    argv = ["prune", "schedule", flag, value, "--out", str(tmp_path / "never")]
    monkeypatch.delenv(cli.TRACEBACK_ENV, raising=False)
    assert cli.main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("pointsparse prune: error: ") and flag in err and "Traceback" not in err
    monkeypatch.setenv(cli.TRACEBACK_ENV, "1")
    with pytest.raises(ValueError, match=flag):
        cli.main(argv)
    assert not (tmp_path / "never").exists()
