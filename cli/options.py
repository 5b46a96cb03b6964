"""Conventions shared by every command: the default store, output and quiet options.

* **Default store.** ``STORE`` may be left out when ``$DYNSTORE_STORE`` names
  a store, or the working directory holds a ``dynstore.toml`` (the store
  itself, or a file whose ``store = "path"`` points at one).
* **Output.** Commands that print data take ``--format`` (see
  :mod:`dynstore.cli.output`) and ``--json`` as its shorthand; commands that
  report what they did take ``--json`` alone (the result's ``to_dict()``).
* **Quiet.** ``-q/--quiet`` drops progress bars and notes on stderr, and the
  one-line report of commands that only change the store; progress bars are
  drawn only when stderr is a terminal, so logs of cron jobs stay clean.
"""
from __future__ import annotations

import os
import sys
import tomllib
from pathlib import Path
from typing import Callable

import click

from dynstore.cli.output import FORMATS

__all__ = ["StoreCommand", "default_store", "store_argument", "new_store_argument", "format_options", "json_option",
           "output_format", "quiet_option", "show_progress", "is_store", "LazyHelpOption"]

STORE_HELP = ("STORE may be left out when $DYNSTORE_STORE names one or the working directory holds a "
              "dynstore.toml.")


def is_store(path: str) -> bool:
    """True when ``path`` is a store directory (it holds ``dynstore.toml``)."""
    return (Path(path) / "dynstore.toml").is_file()


def default_store() -> str | None:
    """The store to use when the command line names none, or None.

    ``$DYNSTORE_STORE``; else ``./dynstore.toml``: the working directory is
    a store, or that file says ``store = "path/to/store"`` (relative to the
    working directory).
    """
    env = os.environ.get("DYNSTORE_STORE", "").strip()
    if env:
        return env
    here = Path("dynstore.toml")
    if not here.is_file():
        return None
    try:
        raw = tomllib.loads(here.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError):
        return "."  # let opening the store report what is wrong with it
    if "format_version" in raw:
        return "."
    target = raw.get("store")
    return str(target) if isinstance(target, str) and target.strip() else None


class StoreCommand(click.Command):
    """A command whose first argument is ``STORE``, which may be omitted.

    ``store_given(positionals)`` tells from the positional arguments on the
    command line whether they start with a store; if not, the default store
    is put in front. The default rule: more positionals than the command's
    other required arguments.
    """

    def __init__(self, *args, store_given: Callable[[list[str]], bool] | None = None, **kwargs):
        super().__init__(*args, **kwargs)
        required = sum(1 for p in self.params if isinstance(p, click.Argument) and p.required) - 1
        self.store_given = store_given or (lambda pos: len(pos) > required)

    def parse_args(self, ctx: click.Context, args: list[str]) -> list[str]:
        if not any(a in ("-h", "--help") for a in args):
            positionals = self._positionals(ctx, args)
            if positionals is not None and not self.store_given(positionals):
                store = default_store()
                if positionals and (store is None or is_store(positionals[0])):
                    # the store was given and another argument forgotten: click names that one
                    return super().parse_args(ctx, args)
                if store is None:
                    raise click.UsageError(
                        "Missing argument 'STORE' (or set DYNSTORE_STORE, or run where a dynstore.toml is).", ctx)
                args = [store, *args]
        return super().parse_args(ctx, args)


    def _positionals(self, ctx: click.Context, args: list[str]) -> list[str] | None:
        """The positional tokens of ``args`` in order (options and their values left out)."""
        try:
            opts, extra, order = self.make_parser(ctx).parse_args(args=list(args))
        except click.UsageError:
            return None  # click reports it properly when it parses for real
        out: list[str] = []
        for param in order:
            if isinstance(param, click.Argument) and param.name in opts:
                value = opts[param.name]
                values = value if isinstance(value, (list, tuple)) else [value]
                out.extend(v for v in values if isinstance(v, str))  # click marks missing ones UNSET
        return out + list(extra)


def store_argument(fn):
    """The ``STORE`` argument (shown as ``[STORE]``: it has a default)."""
    return click.argument("store", metavar="[STORE]", type=click.Path(file_okay=False))(fn)


def new_store_argument(fn):
    """The ``STORE`` argument of a command that creates the store (``init``): required."""
    return click.argument("store", type=click.Path(file_okay=False))(fn)


def quiet_option(fn):
    """``-q/--quiet``; the command gets ``quiet``."""
    return click.option("-q", "--quiet", is_flag=True,
                        help="No progress bars or notes on stderr; commands that only change the store "
                             "print nothing.")(fn)


def json_option(help: str = "Print the result as JSON."):
    """``--json`` alone, for commands that report one result (their text is a sentence, not rows)."""
    return click.option("--json", "as_json", is_flag=True, help=help)


def output_format(fmt: str, as_json: bool) -> str:
    """The format asked for: ``--json`` wins over ``--format``."""
    return "json" if as_json else fmt


def _remember(ctx: click.Context, param: click.Parameter, value):
    """Keep ``--max-width`` / ``--no-headers`` where :func:`output.render` finds them."""
    ctx.meta[f"dynstore.{param.name}"] = value
    return value


def format_options(fn):
    """``--format`` and its ``--json`` shorthand (the command gets ``fmt``), ``--no-headers`` and
    ``--max-width`` (read by :func:`output.render` from the command's context)."""
    fn = click.option("--max-width", type=click.IntRange(min=0), default=None, callback=_remember,
                      expose_value=False, metavar="N",
                      help="Fit table output to N characters, saying what was cut (0: never cut; default: the "
                           "terminal's width, no limit when stdout is not a terminal). Other formats are never cut.")(fn)
    fn = click.option("--no-headers", is_flag=True, callback=_remember, expose_value=False,
                      help="Print rows without the header line (table, csv, tsv, markdown).")(fn)
    fn = click.option("--json", "as_json", is_flag=True, help="Shorthand for --format json.")(fn)
    fn = click.option("--format", "fmt", type=click.Choice(FORMATS), default="table", show_default=True,
                      help="Output format; nested values are written as JSON.")(fn)
    return fn


def show_progress(quiet: bool) -> bool:
    """Progress bars only for a person watching: not quiet, stderr a terminal."""
    return not quiet and sys.stderr.isatty()


class LazyHelpOption(click.Option):
    """An option whose help text is computed when help is shown.

    Used where the text quotes constants of a module that is expensive to
    import (``dynstore.model.finetune`` imports numpy), so ``--help`` stays fast.
    """

    def __init__(self, *args, lazy_help: Callable[[], str], **kwargs):
        super().__init__(*args, **kwargs)
        self._lazy_help = lazy_help

    def get_help_record(self, ctx):
        self.help = self._lazy_help()
        return super().get_help_record(ctx)
