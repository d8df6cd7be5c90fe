"""What every command-line tool shares (``tools/*.py``, ``python -m megatron_elastic.train``):
one-line errors, the console's verbosity, and options whose defaults are the library's.

    @cli.entry_point
    def main(argv=None) -> int:
        parser = cli.ArgumentParser(description=...)
        ...
        parser.take_defaults(library_function)  # its keyword defaults become the options'
        args = parser.parse_args(argv)   # also: --verbose

A user error, raised anywhere below ``main`` as ``ValueError`` (the project's convention: every
reader of checkpoints, safetensors, tokenizers, datasets, YAML and JSON turns a damaged file into
one naming the file) or as an ``OSError`` about a path, ends the tool with ``error: ...`` on
stderr and exit status 2, without a traceback. Anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import inspect
import sys
from collections.abc import Callable, Sequence
from typing import Any

from megatron_elastic import console

__all__ = [
    "EXIT_USER_ERROR",
    "USER_ERRORS",
    "ArgumentParser",
    "entry_point",
    "one_line",
    "options",
]

# Tools import this module first, so the console is configured before any of them imports
# torch, megatron-core or transformers (some do, to build their parsers). ``--verbose`` is
# looked for here because import-time output comes before the parser runs.
if "--verbose" in sys.argv[1:]:
    console.set_verbose(True)
console.quiet()

EXIT_USER_ERROR = 2
"""Exit status of a tool stopped by bad input (argparse's own status for bad arguments)."""

USER_ERRORS: tuple[type[BaseException], ...] = (
    ValueError,
    FileNotFoundError,
    FileExistsError,
    IsADirectoryError,
    NotADirectoryError,
    PermissionError,
)
"""What a tool reports as ``error: ...`` (exit 2) instead of a traceback."""


def one_line(exc: BaseException) -> str:
    """The exception's message on one line (multi-line messages of third-party libraries are
    joined), or its type's name when it has none."""
    text = " ".join(part.strip() for part in str(exc).splitlines() if part.strip())
    return text or type(exc).__name__


class ArgumentParser(argparse.ArgumentParser):
    """``argparse.ArgumentParser`` with the options every tool has (``--verbose``, passed on
    to the tool's child processes)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("formatter_class", argparse.RawDescriptionHelpFormatter)
        super().__init__(*args, **kwargs)
        self.add_argument(
            "--verbose",
            action="store_true",
            help=f"show third-party warnings and native-library output ({console.VERBOSE_ENV}=1 "
            "does the same, also for child processes)",
        )

    def take_defaults(self, library: Callable[..., Any], **renamed: str) -> None:
        """Give each option whose destination names a keyword parameter of ``library`` (the
        library function the tool calls, or a config dataclass) that parameter's default, so that
        the library states each default once and the tool none (``--help`` shows it through
        ``%(default)s``). ``renamed``: option destination -> parameter name where they differ.
        Call after adding the options."""
        parameters = inspect.signature(library).parameters
        dests = {action.dest: action for action in self._actions}
        assert set(renamed) <= set(dests), f"renamed names no option: {set(renamed) - set(dests)}"
        found = {}
        for dest, action in dests.items():
            parameter = parameters.get(renamed.get(dest, dest))
            if parameter is None or parameter.default is parameter.empty:
                continue
            assert action.default is None or action.default is False, (
                f"option {dest!r} states its own default {action.default!r}; "
                f"{library.__qualname__}'s ({parameter.default!r}) is the one default"
            )
            default = parameter.default
            if action.nargs in ("+", "*") and isinstance(default, tuple):
                default = list(default)  # what argparse gives when the option is passed
            found[dest] = default
        self.set_defaults(**found)

    def parse_args(self, args: Sequence[str] | None = None, namespace: Any = None) -> Any:  # type: ignore[override]
        parsed = super().parse_args(args, namespace)
        if parsed.verbose:
            console.set_verbose(True)
        return parsed


def options(args: argparse.Namespace, *drop: str) -> dict[str, Any]:
    """The parsed arguments as keyword arguments of the library function a tool calls: all but
    ``--verbose`` (the parser's own) and ``drop``."""
    return {k: v for k, v in vars(args).items() if k not in ("verbose", *drop)}


def gather(options: dict[str, Any], **configs: type) -> dict[str, Any]:
    """``options`` (see :func:`options`) with the fields of each config dataclass moved into one
    instance of it under its keyword: ``gather(opts, inputs=EvalInputsConfig)`` for a library
    function taking ``inputs: EvalInputsConfig`` (fields the tool has no option for keep the
    dataclass's defaults)."""
    out = dict(options)
    for name, config_type in configs.items():
        fields = {f.name for f in dataclasses.fields(config_type)}
        out[name] = config_type(**{k: out.pop(k) for k in list(out) if k in fields})
    return out


def entry_point(main: Callable[[list[str] | None], int]) -> Callable[[list[str] | None], int]:
    """Wrap a tool's ``main(argv) -> exit status``: user errors become one line and exit 2."""

    @functools.wraps(main)
    def run(argv: list[str] | None = None) -> int:
        try:
            return main(argv)
        except USER_ERRORS as exc:
            print(f"error: {one_line(exc)}", file=sys.stderr, flush=True)
            return EXIT_USER_ERROR
        except KeyboardInterrupt:
            print("interrupted", file=sys.stderr, flush=True)
            return 130

    return run
