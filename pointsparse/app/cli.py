"""The ``pointsparse`` command line (``python -m pointsparse``, the
``pointsparse`` console script): ``pointsparse <command> --help``.

Each command lives in its own module of this package exposing
``add_arguments(parser)`` and ``main(args) -> int``; this file lists
them, and holds what their checks of the flags share (:func:`given_flags`)."""

from __future__ import annotations

import argparse
import contextlib
import functools
import importlib
import os
import sys
from pathlib import Path

from .._ext import MissingExtra

# (command, module, one-line help)
COMMANDS = [
    ("demo", "pointsparse.app.demo", "run the main job on data pointsparse generates itself"),
    ("train", "pointsparse.app.train", "train a sparse U-Net for semantic segmentation and report its mIoU"),
    ("eval", "pointsparse.app.evaluate", "score a segmentation checkpoint (per-class IoU, mIoU) on point clouds"),
    ("export", "pointsparse.app.export", "write a segmentation checkpoint as a torch.export program (.pt2)"),
    ("predict", "pointsparse.app.predict",
     "segment point cloud files with a checkpoint or an exported program; write each point's class"),
    ("bench", "pointsparse.app.benchmark", "run the benchmark suites in bench/ (kernel maps, convolution, SpMM)"),
    ("prune", "pointsparse.app.prune",
     "pruning: channels, vectors, offsets or voxels of a trained checkpoint, and the procedures sensitivity, "
     "schedule, lottery, init, rigl, amc, netadapt"),
]


class _Untyped:
    """The value :class:`CommandParser` starts every option at to see which were typed."""


class CommandParser(argparse.ArgumentParser):
    """A command's parser that records, as ``args._typed``, the options typed
    on its command line (their dests), whatever their values: argparse itself
    reads the words a second time into a namespace that holds a mark for
    every option, so ``--flag=value`` and the abbreviations it accepts count
    as typed, and an option it leaves at the mark was not (:func:`given_flags`
    reads the record). The words it did not take, if any, it records with
    itself as ``args._unrecognized``, for :func:`main` to name them under
    this command's usage."""

    #: Options whose value is the next word whatever it starts with, set by a
    #: command's ``add_arguments`` (bench's ``--args``): argparse reads a word
    #: that starts with '-' and holds no space as an option, so ``--args
    #: '--no-variants'`` was 'expected one argument'.
    verbatim_options: tuple[str, ...] = ()

    def parse_known_args(self, args=None, namespace=None):
        for action in self._actions:  # (every command's parser, the CLI's and train's own for torchrun)
            if action.dest in PATH_OPTIONS and not getattr(action.type, "refuses_empty", False):
                action.type = _nonempty(action.type)
        args = sys.argv[1:] if args is None else list(args)
        args = _glue_values(args, self.verbatim_options)
        parsed, extras = super().parse_known_args(args, namespace)
        if namespace is None:  # (into a namespace of the caller's, what it held would read as typed)
            untyped = _Untyped()
            # (argparse sets no default on an attribute the namespace holds: only what is typed replaces the mark)
            probe = argparse.Namespace(**dict.fromkeys(vars(parsed), untyped))
            super().parse_known_args(args, probe)
            parsed._typed = frozenset(name for name, value in vars(probe).items() if value is not untyped)
        if extras:  # (argparse hands them up to the top parser, whose error would show the program's usage)
            parsed._unrecognized = (self, tuple(extras))
        return parsed, extras


def _glue_values(words: list[str], options) -> list[str]:
    """``words`` with each of ``options`` and the word after it as one
    ``option=word`` (up to a ``--``, and not for the last word: argparse's
    'expected one argument' stays)."""
    out, i = [], 0
    while i < len(words):
        if words[i] == "--":
            return out + words[i:]
        if words[i] in options and i + 1 < len(words):
            out.append(f"{words[i]}={words[i + 1]}")
            i += 2
        else:
            out.append(words[i])
            i += 1
    return out


def build_parser(commands=None) -> argparse.ArgumentParser:
    """The tool's parser. ``commands``: the names of the commands whose
    modules are imported and whose options it takes (None: every one); the
    others are listed with their help line only. :func:`main` imports just
    the command typed (none for the tool's own help): every command's
    module took a CLI call about 1.5 s more on 2 cores (torch's compiler,
    imported by the pruning package, for ``pointsparse --help`` too)."""
    parser = argparse.ArgumentParser(
        prog="pointsparse",
        description="pointsparse: sparse 3-D convolution for point clouds, and pruning that makes models "
                    "really smaller and faster. Start with `pointsparse demo`.",
        epilog="commands: " + ", ".join(f"{name} ({module})" for name, module, _ in COMMANDS) + ". The "
               "application is pointsparse.app; the library (pointsparse.tensor, voxelize, kmap, nn, models, data, "
               "prune, formats, ops, export, checkpoint) never imports it.",
    )
    from .. import __version__  # noqa: PLC0415 - the package is imported by then (this module is in it)

    parser.add_argument("--version", action="version", version=f"pointsparse {__version__}",
                        help="print the version and exit")
    sub = parser.add_subparsers(dest="command", metavar="<command>", parser_class=CommandParser)
    for name, module_name, help_text in COMMANDS:
        if commands is not None and name not in commands:
            sub.add_parser(name, help=help_text)
            continue
        module = importlib.import_module(module_name)
        # (the docstring's first paragraph, whole: its first line alone cut demo's sentence at a comma)
        first = (module.__doc__ or help_text).strip().split("\n\n")[0]
        p = sub.add_parser(name, help=help_text, description=" ".join(first.split()))
        module.add_arguments(p)
        p.set_defaults(_module=module)
    return parser


#: The options that name a file or folder (each command's of these dests).
PATH_OPTIONS = ("out", "data", "val_data", "checkpoint", "program", "resume", "init", "label_map", "val_label_map")


def _nonempty(convert):
    """``convert`` (an option's type, None for the word itself) that first
    refuses an empty word (:class:`CommandParser` puts it on each option of
    :data:`PATH_OPTIONS` before it parses), argparse's error naming the option: ``Path('')``
    is the current folder, where ``--out ''`` (an unset shell variable)
    wrote a run's files and ``--data ''`` read every cloud."""
    def path(word: str):
        if word == "":
            raise argparse.ArgumentTypeError("expected a file or folder, got an empty string")
        return word if convert is None else convert(word)

    path.__name__ = getattr(convert, "__name__", "path")
    path.refuses_empty = True
    return path


@functools.lru_cache(maxsize=None)
def defaults(add_arguments) -> argparse.ArgumentParser:
    """A parser of a command's flags (``add_arguments``), for their defaults."""
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    return parser


def given_flags(args, add_arguments, *names: str) -> list[str]:
    """``--flag [value]`` of each of ``names`` typed on the command line,
    whatever its value (``args._typed``, which :class:`CommandParser`
    records); of a namespace without that record (made by another parser,
    or by hand), each that ``args`` sets to another value than the parser of
    ``add_arguments`` gives by default (None and False: not given). True:
    the flag alone; a list: its words."""
    typed = getattr(args, "_typed", None)
    parser = defaults(add_arguments)
    flags = []
    for name in names:
        value = getattr(args, name, None)
        if (name not in typed if typed is not None else
                value is None or value is False or value == parser.get_default(name)):
            continue
        flag = f"--{name.replace('_', '-')}"
        flags.append(flag if value is True else
                     f"{flag} {' '.join(map(str, value)) if isinstance(value, list) else value}")
    return flags


#: Set to 1 for the traceback of a bad-input error instead of its message alone.
TRACEBACK_ENV = "POINTSPARSE_TRACEBACK"


def main(argv: list[str] | None = None) -> int:
    """Runs a command; 0 on success. Bad input (a ValueError, which names the
    flag or the file, a file that is not there or another path the system
    refuses: an OSError naming the path, or an optional package the input
    needs that is not installed: ``_ext.MissingExtra``) prints ``pointsparse <command>: error:
    <message>`` on stderr and returns 2, as argparse does for a bad flag,
    unless ``POINTSPARSE_TRACEBACK=1`` asks for the traceback; a training
    run that diverged (``TrainingDiverged``) prints its error line so and
    returns 1; Ctrl-C
    (KeyboardInterrupt) prints ``pointsparse <command>: interrupted`` and
    returns 130, or, run as the program (``argv`` None), ends the process
    by SIGINT as Python does (a shell's loop of commands then stops too);
    SIGTERM alike (:class:`Terminated`: ``terminated (SIGTERM)``, 143 or
    the process ended by SIGTERM), what the command was writing cleaned up."""
    words = sys.argv[1:] if argv is None else list(argv)
    # (the command: the first word not an option; the tool's own options, -h alone, take no value)
    typed = next((w for w in words if not w.startswith("-")), None)
    try:  # (the command's module imports here, torch with it: a Ctrl-C then was a traceback of the import)
        parser = build_parser([typed] if typed in {name for name, _, _ in COMMANDS} else [])
        args, extras = parser.parse_known_args(words)
    except KeyboardInterrupt:
        if _traceback_asked():
            raise
        known = typed in {name for name, _, _ in COMMANDS}
        return _interrupted(f"pointsparse{' ' + typed if known else ''}: interrupted", argv)
    if extras:
        # The command's own usage and error line: argparse's parse_args reported the words the command did not
        # take with the program's usage, which shows none of the command's options. Words typed before the
        # command stay the program's error, all the unknown words named, as before.
        command_parser, theirs = getattr(args, "_unrecognized", (parser, ()))
        (command_parser if len(theirs) == len(extras) else parser).error(
            f"unrecognized arguments: {' '.join(extras)}")
    if args.command is None:
        parser.print_help()
        return 0
    try:
        with _terminate_as_interrupt():
            return int(args._module.main(args) or 0)
    except KeyboardInterrupt as stop:  # (Ctrl-C, or SIGTERM: a line, not a traceback)
        if _traceback_asked():
            if isinstance(stop, Terminated) and argv is None:  # (raised, it ended the process as SIGINT does)
                import traceback

                traceback.print_exc()
                _end_by("SIGTERM")
            raise
        again = ""
        if args.command == "train" and (Path(args.out) / args._module.CHECKPOINT).is_file():
            again = " (train --resume continues from its last checkpoint)"
        if isinstance(stop, Terminated):
            return _interrupted(f"pointsparse {args.command}: terminated (SIGTERM){again}", argv, "SIGTERM")
        return _interrupted(f"pointsparse {args.command}: interrupted{again}", argv)
    except (ValueError, OSError, MissingExtra) as error:
        # (an OSError naming no path, a full disk on write or a broken pipe, is the system's failure: raised)
        if _traceback_asked() or (
                isinstance(error, OSError) and not isinstance(error, FileNotFoundError) and error.filename is None):
            raise
        return _error_line(args.command, _message(error), 2)
    except RuntimeError as error:  # (a diverged run: its message says what to change; a failure, not bad input)
        from .trainer import TrainingDiverged

        if not isinstance(error, TrainingDiverged) or _traceback_asked():
            raise
        return _error_line(args.command, str(error), 1)


def _traceback_asked() -> bool:
    """Whether ``POINTSPARSE_TRACEBACK`` asks for tracebacks."""
    return os.environ.get(TRACEBACK_ENV, "") not in ("", "0")


def _error_line(command: str, message: str, status: int) -> int:
    """``status``, after the command's error line (and how to see the traceback) on stderr."""
    print(f"pointsparse {command}: error: {message}\n(set {TRACEBACK_ENV}=1 for the traceback)", file=sys.stderr)
    return status


def _interrupted(line: str, argv, signal_name: str = "SIGINT") -> int:
    """128 + the signal's number (130 for SIGINT, 143 for SIGTERM) after
    ``line`` on stderr; run as the program (``argv`` None), the process ends
    by that signal instead, as Python's does for SIGINT, so that a shell's
    loop of commands stops too."""
    print(line, file=sys.stderr)
    if argv is None:
        _end_by(signal_name)
    return {"SIGINT": 130, "SIGTERM": 143}[signal_name]


class Terminated(KeyboardInterrupt):
    """SIGTERM (a scheduler's preemption, ``kill``) in a command: raised in
    the main thread as a Ctrl-C is, so that what a command is writing is
    cleaned up as for a Ctrl-C (a checkpoint's temporary file: the default
    action ended the process and left it, 49 MB, behind) and it ends with
    one line."""


@contextlib.contextmanager
def _terminate_as_interrupt():
    """SIGTERM raises :class:`Terminated` in this process's main thread
    while the block runs (the previous handler back after it); in a forked
    child (a data loader's worker) the signal keeps its default action.
    Nothing is installed off the main thread (Python allows it there only)."""
    import signal
    import threading

    if not hasattr(signal, "SIGTERM") or threading.current_thread() is not threading.main_thread():
        yield
        return
    owner = os.getpid()

    def terminate(signum, frame):
        if os.getpid() != owner:  # (a forked child: its default action, as before)
            signal.signal(signal.SIGTERM, signal.SIG_DFL)
            os.kill(os.getpid(), signal.SIGTERM)
            return
        # (the cleanup that Terminated runs is not cut short by a second signal: a process group's SIGTERM
        # reaches a --nproc worker, and then its parent's SIGINT; that KeyboardInterrupt, raised in the cleanup,
        # left the checkpoint's temporary file)
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        raise Terminated()

    previous, previous_int = signal.signal(signal.SIGTERM, terminate), signal.getsignal(signal.SIGINT)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)
        if previous_int is not None:  # (None: a handler not installed from Python, left as it is)
            signal.signal(signal.SIGINT, previous_int)


@contextlib.contextmanager
def terminated_after_cleanup():
    """SIGTERM raises :class:`Terminated` while the block runs, so that what
    it was writing is cleaned up (a checkpoint's temporary file), and then
    ends the process by SIGTERM, as the default action would have: for a
    process with no command line of its own to print (a ``--nproc``
    worker, a torchrun process), whose parent reads how it ended."""
    try:
        with _terminate_as_interrupt():
            yield
    except Terminated:
        _end_by("SIGTERM")
        raise


def _end_by(signal_name: str) -> None:
    """This process ended by the signal named (``"SIGINT"``, ``"SIGTERM"``),
    its default action restored (where the platform has it; else the
    caller returns its code)."""
    import signal

    signum = getattr(signal, signal_name, None)
    if signum is not None and hasattr(os, "kill"):
        signal.signal(signum, signal.SIG_DFL)
        os.kill(os.getpid(), signum)


def _message(error: Exception) -> str:
    """The error line's message: an OSError the system raised on a path (a
    name too long, a permission refused) as ``path: what`` (its
    ``[Errno N]`` left out), every other error as it words itself."""
    if isinstance(error, OSError) and error.strerror and error.filename is not None:
        names = [error.filename] + ([error.filename2] if error.filename2 is not None else [])
        return f"{' -> '.join(map(os.fsdecode, names))}: {error.strerror}"
    return str(error)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
