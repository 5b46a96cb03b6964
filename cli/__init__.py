"""The ``dynstore`` command line: a thin layer over the Python API.

Each command opens the store, calls one API method and formats the result;
a :class:`~dynstore.DynstoreError` becomes a one-line ``Error: ...`` and exit
code 1 (3 when the store is busy, 2 for usage errors, 130 on Ctrl-C).
Results go to stdout, progress and notes to stderr. Conventions shared by
every command (the default store, ``--format``, ``-q``) are in
:mod:`dynstore.cli.options`; importing this module loads neither duckdb nor
numpy, so ``dynstore --help`` is instant.
"""
from __future__ import annotations

import functools
import sys
from typing import TYPE_CHECKING

import click

from dynstore.cli.options import (LazyHelpOption, StoreCommand, format_options, is_store, json_option, new_store_argument,
                      output_format, quiet_option, show_progress, store_argument)
from dynstore.cli.output import key_values, render, to_json

if TYPE_CHECKING:  # pragma: no cover
    from dynstore.results import RefreshResult

__all__ = ["main"]

EXIT_USER, EXIT_USAGE, EXIT_BUSY, EXIT_INTERRUPTED = 1, 2, 3, 130
KINDS = ("interactions", "items", "users")
SIZES = ("tiny", "small", "medium", "large")  # dynstore.samples.shop.SIZES (not imported: numpy)
PRECISIONS = ("auto", "fp32", "bf16", "fp16", "int8")  # dynstore.encoders.PRECISIONS (not imported: numpy)
ENGINES = ("local", "ray")  # dynstore.engines.ray.ENGINES (not imported: pyarrow)
DEFAULT_SINCE = "30d"  # dynstore.versions.window.DEFAULT_SINCE (not imported: numpy)
SCORE_PRECISIONS = ("fp32", "fp16", "bf16")  # dynstore.serving.precision.PRECISIONS (not imported: numpy)
ENGINE_HELP = ("Where the work runs: local (this process) or ray (a Ray actor pool; $RAY_ADDRESS names the "
               "cluster, else a local one starts; needs pip install 'dynstore[ray]').")
WORKERS_HELP = "Ray actors (default: one per GPU, else per CPU, of the cluster); --engine ray only."
PRECISION_HELP = ("Encoder precision: auto (fp16 on a GPU, bf16 on CPUs with it, else fp32), or int8: "
                  "CPU only, faster, its own vectors and cache.")


def handle_errors(fn):
    """Turn DynstoreError into ``Error: <message>`` and an exit code; Ctrl-C into 130."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        from dynstore.errors import DynstoreError, StoreBusy

        from dynstore.cli.repl import Interrupted

        try:
            return fn(*args, **kwargs)
        except StoreBusy as exc:
            click.echo(f"Error: {exc}", err=True)
            sys.exit(EXIT_BUSY)
        except DynstoreError as exc:
            click.echo(f"Error: {_damage(kwargs, exc) or exc}", err=True)
            sys.exit(EXIT_USER)
        except (KeyboardInterrupt, Interrupted):
            click.echo("Interrupted", err=True)
            sys.exit(EXIT_INTERRUPTED)
        except MemoryError:
            click.echo(f"Error: {_out_of_memory()}", err=True)
            sys.exit(EXIT_USER)
        except Exception as exc:
            if _interrupted(exc):  # Ctrl-C inside a DuckDB query ("Query interrupted")
                click.echo("Interrupted", err=True)
                sys.exit(EXIT_INTERRUPTED)
            if _no_memory(exc):
                click.echo(f"Error: {_out_of_memory()}", err=True)
                sys.exit(EXIT_USER)
            damage = _damage(kwargs, exc)
            if damage is not None:  # a damaged file of the store: which, and the way out
                click.echo(f"Error: {damage}", err=True)
                sys.exit(EXIT_USER)
            # SQL that DuckDB refuses inside a command (a labelling rule over a missing
            # column, say) is the user's to fix: one line, no traceback
            if not type(exc).__module__.lstrip("_").startswith("duckdb"):
                raise
            from dynstore.sql.session import error_message

            click.echo(f"Error: {error_message(exc)}", err=True)
            sys.exit(EXIT_USER)

    return wrapper


#: per command, the setting that bounds its memory (named when it runs out)
MEMORY_HINTS = {
    "refresh": "train on a shorter window (--since 7d, say): memory follows the window's events and the catalogue",
    "score-all": "ask for fewer items per user (-k): every user's list is held until the one commit",
    "encode": "encode with a smaller --batch-size",
    "ingest": "ingest the file in parts",
    "eval": "judge a shorter window (--since)",
}


def _out_of_memory() -> str:
    """One line for a command that ran out of memory: the setting that bounds it."""
    ctx = click.get_current_context(silent=True)
    name = ctx.info_name if ctx is not None else "the command"
    hint = MEMORY_HINTS.get(name, "run it where more memory is free")
    return f"out of memory in `{name}`; nothing was committed past the last commit: {hint}"


def _no_memory(exc: BaseException) -> bool:
    """True for the other ways running out of memory shows: DuckDB's error, a library
    that cannot be mapped (``ulimit -v``), an allocation the OS refused."""
    import errno

    text = str(exc)
    return (type(exc).__name__ == "OutOfMemoryException" or "failed to map segment" in text
            or (isinstance(exc, OSError) and exc.errno == errno.ENOMEM) or "Cannot allocate memory" in text)


def _interrupted(exc: BaseException) -> bool:
    """True for DuckDB's way of saying a query was cancelled by Ctrl-C."""
    return type(exc).__name__ == "InterruptException" or (
        isinstance(exc, RuntimeError) and str(exc).strip().startswith("Query interrupted"))


def _damage(kwargs: dict, exc: BaseException):
    """The store's damaged file behind ``exc`` (a StoreCorrupt naming it), or None."""
    from dynstore.storage.catalog import find_damage
    from dynstore.errors import StoreCorrupt

    if isinstance(exc, StoreCorrupt) or "store" not in kwargs:
        return None
    return find_damage(kwargs["store"], exc)


def _open(store: str, *, read_only: bool = False):
    from dynstore.cli.startup import import_arrow_quickly

    import_arrow_quickly()
    import dynstore

    _announce_encoder_loads()
    return dynstore.connect(store, read_only=read_only)


def _announce_encoder_loads() -> None:
    """Say on stderr, at once, when a command must load a model encoder (seconds of silence
    otherwise); -q keeps quiet. Commands that encode nothing never load one."""
    from dynstore.encoders import set_load_notice

    ctx = click.get_current_context(silent=True)
    quiet = bool(ctx is not None and ctx.params.get("quiet"))
    set_load_notice(None if quiet else lambda message: click.echo(message, err=True))


def _note(quiet: bool, message: str) -> None:
    if not quiet:
        click.echo(message, err=True)


def _rows(n: int) -> str:
    """``n`` rows, in words: 1 row, 2 rows."""
    return f"{n} row{'' if n == 1 else 's'}"


def _kind_first(pos: list[str]) -> bool:
    """For ingest/delete: the positionals start with a store unless the first is a table name."""
    return not (pos and pos[0] in KINDS and not is_store(pos[0]))


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(package_name="dynstore")
def main():
    """dynstore: an embedded store for recommender systems.

    \b
    Quick tour:
      dynstore demo                       # build a sample store and show it working
      dynstore init shop
      dynstore ingest shop items items.csv
      dynstore ingest shop interactions events.parquet
      dynstore encode shop
      dynstore recommend shop 42 -k 10
      dynstore sql shop "SELECT recommend(42, 10)"
      export DYNSTORE_STORE=shop; dynstore inspect

    STORE may be left out of every command but init and demo when $DYNSTORE_STORE
    names a store or the working directory holds a dynstore.toml. Exit codes:
    0 success, 1 error, 2 usage, 3 store busy, 130 interrupted (Ctrl-C).
    """
    from dynstore.memory import cap_malloc_arenas

    cap_malloc_arenas()  # this process is dynstore's own: before Lance starts its threads


# -------------------------------------------------------------------------- init


@main.command()
@new_store_argument
@click.option("--model", default=None, help="Encoder: 'minilm' (default, bundled), 'fake', or a local Hugging Face path.")
@click.option("--positive", default=None, help="SQL rule labelling a positive interaction (default: value > 0).")
@click.option("--negative", default=None, help="SQL rule labelling a negative interaction (default: value <= 0).")
@click.option("--item-text", default=None, help="SQL expression over item columns rendering the item document.")
@click.option("--max-length", type=click.IntRange(min=2), default=None,
              help="Encoder max tokens per document (default 256).")
@click.option("--precision", type=click.Choice(PRECISIONS), default=None, help=PRECISION_HELP)
@json_option("Print the new store's config as JSON.")
@quiet_option
@handle_errors
def init(store: str, model, positive, negative, item_text, max_length, precision, as_json, quiet):
    """Create a new store in STORE (a new or empty directory).

    \b
    Examples:
      dynstore init shop
      dynstore init shop --positive "event IN ('click','purchase')" --negative "event = 'skip'"
      dynstore init films --item-text "title || ' ' || genres" --model ./my-bert
    """
    import dynstore

    s = dynstore.init(store, positive=positive, negative=negative, item_text=item_text, model=model,
                      max_length=max_length, precision=precision)
    if as_json:
        click.echo(to_json({"store": str(s.path), **_config_view(s.config)}))
    elif not quiet:
        click.echo(f"created store {s.path} (positive: {s.config.positive}; negative: {s.config.negative}; "
                   f"encoder: {s.config.model})")


# -------------------------------------------------------------------------- ingest


def _parse_map(pairs) -> dict[str, str]:
    out = {}
    for p in pairs:
        new, sep, old = p.partition("=")
        if not sep or not new or not old:
            raise click.BadParameter(f"{p!r}: expected NEW=OLD", param_hint="--map")
        out[new] = old
    return out


@main.command(cls=StoreCommand, store_given=_kind_first)
@store_argument
@click.argument("kind", type=click.Choice(KINDS))
@click.argument("files", nargs=-1, required=True, type=click.Path())
@click.option("--map", "mapping", multiple=True, metavar="NEW=OLD", help="Rename a column of the files (repeatable).")
@click.option("--input-format", "input_format",
              type=click.Choice(["csv", "tsv", "parquet", "json", "ndjson"]), default=None,
              help="Read FILES as this format instead of guessing from the extension.")
@click.option("--format", "old_format", hidden=True, default=None,  # the name before --input-format
              type=click.Choice(["csv", "tsv", "parquet", "json", "ndjson"]))
@click.option("--dedupe", is_flag=True,
              help="Interactions: skip rows equal in every column to a stored row or an earlier row of this ingest.")
@click.option("--key", "keys", multiple=True, metavar="COLUMN",
              help="Interactions: skip rows whose COLUMN value (e.g. event_id) is already stored; repeatable "
                   "for a key of several columns. Implies --dedupe on those columns.")
@click.option("--allow-future", is_flag=True,
              help="Interactions: keep timestamps more than a day after now (refused by default: one "
                   "row from year 2999 would end every relative refresh window).")
@json_option()
@quiet_option
@handle_errors
def ingest(store: str, kind, files, mapping, input_format, old_format, dedupe, keys, allow_future, as_json, quiet):
    """Load FILES into a table: interactions are appended, items/users upserted by id.

    All files land in one commit, or none does: a bad row rejects the whole
    command with a message naming file, row and column. Running the same
    interactions ingest twice stores them twice unless --dedupe or --key
    says what a duplicate is. A quoted pattern ('day-*.csv') names every
    matching file. Columns named label (interactions derive it from the
    rules) or starting with __ are reserved: rename them with --map.

    \b
    Examples:
      dynstore ingest shop items items.csv
      dynstore ingest shop interactions day1.parquet day2.parquet
      dynstore ingest shop interactions day2.parquet --key event_id
      dynstore ingest films interactions ratings.csv --map user_id=userId --map item_id=movieId --map ts=timestamp
    """
    dedupe_on = list(keys) if keys else (True if dedupe else False)
    with _open(store) as s:
        out = s.ingest(kind, list(files), mapping=_parse_map(mapping), format=input_format or old_format,
                       dedupe=dedupe_on, allow_future=allow_future)
    if as_json:
        click.echo(to_json(out.to_dict()))
    elif not quiet:
        line = f"ingested {out.rows} rows into {kind} ({out.total} in total, dataset version {out.version})"
        if out.duplicates_skipped is not None:
            line += f"; skipped {out.duplicates_skipped} duplicates (key: {', '.join(out.key)})"
        click.echo(line)
    unknown = out.unknown_items
    if unknown and not as_json:
        examples = ", ".join(repr(x) for x in unknown["examples"])
        rows = f"{unknown['rows']} row names" if unknown["rows"] == 1 else f"{unknown['rows']} rows name"
        ids = "an item id" if unknown["ids"] == 1 else f"{unknown['ids']} item ids"
        _note(quiet, f"warning: {rows} {ids} not in items (e.g. {examples}); they are stored, and count "
                     "once those items are ingested")


# -------------------------------------------------------------------------- encode


@main.command(cls=StoreCommand)
@store_argument
@click.option("--all", "all_", is_flag=True, help="Re-encode every item, not just stale ones.")
@click.option("--batch-size", type=click.IntRange(min=1), default=64, show_default=True,
              help="Sizes each forward pass of the encoder (its token budget).")
@click.option("--device", type=click.Choice(["cpu", "cuda"]), default=None, help="Default: cuda when present.")
@click.option("--precision", type=click.Choice(PRECISIONS), default=None,
              help=PRECISION_HELP + " Given here, it becomes the store's setting.")
@click.option("--engine", type=click.Choice(ENGINES), default="local", show_default=True, help=ENGINE_HELP)
@click.option("--workers", type=click.IntRange(min=1), default=None, help=WORKERS_HELP)
@json_option()
@quiet_option
@handle_errors
def encode(store: str, all_, batch_size, device, precision, engine, workers, as_json, quiet):
    """Encode stale items (new or changed documents) into semantic vectors.

    Vectors are committed in chunks, so an interrupted run (Ctrl-C, a crash)
    keeps what it finished and the next run resumes with what is still stale.
    Switching to --precision int8 (about 1.4x faster on a CPU, cosine ~0.997
    to fp32) starts a separate cache: every item is encoded once more.

    \b
    Examples:
      dynstore encode shop
      dynstore encode shop --all --device cuda --json
      dynstore encode shop --precision int8
      RAY_ADDRESS=auto dynstore encode shop --engine ray --workers 4
    """
    if workers is not None and engine != "ray":
        raise click.UsageError("--workers needs --engine ray")
    with _open(store) as s:
        out = s.encode(all=all_, batch_size=batch_size, device=device, progress=show_progress(quiet),
                       precision=precision, engine=engine, workers=workers)
    if as_json:
        click.echo(to_json(out.to_dict()))
    elif not quiet:
        rate = f", {out.items_per_s} docs/s" if out.encoded else ""
        on = f", ray: {out.workers} worker{'s' * (out.workers != 1)}" if out.engine == "ray" else ""
        click.echo(f"{out.items} items: {out.stale} stale, {out.encoded} documents encoded, "
                   f"{out.reused} reused from cache ({out.seconds}s{rate}{', ' + out.device if out.encoded else ''}{on})")
        if out.version:
            click.echo(f"created version {out.version} (the popularity rule; `dynstore refresh` trains one)")


# -------------------------------------------------------------------------- score-all


@main.command("score-all", cls=StoreCommand)
@store_argument
@click.option("-k", type=click.IntRange(1, 10_000), default=100, show_default=True, help="Items per user.")
@click.option("--engine", type=click.Choice(ENGINES), default="local", show_default=True, help=ENGINE_HELP)
@click.option("--workers", type=click.IntRange(min=1), default=None, help=WORKERS_HELP)
@click.option("--precision", type=click.Choice(SCORE_PRECISIONS), default="fp32", show_default=True,
              help="Precision of the user-item product. fp16/bf16 run it in half precision as a prefilter "
                   "whose candidates are rescored in fp32: the same lists, faster only where the hardware "
                   "has a half-precision GEMM (GPUs, CPUs with AMX); slower elsewhere.")
@json_option()
@quiet_option
@handle_errors
def score_all(store: str, k, engine, workers, precision, as_json, quiet):
    """Write every user's top-k of the current version to the batch_recommendations table.

    The lists equal what `recommend` serves (the user's positives excluded);
    the table (user_id, rank, item_id, score, version) is replaced in one
    commit, so readers of the SQL view batch_recommendations see the old
    table or the new one, whole.

    \b
    Examples:
      dynstore score-all shop -k 50
      RAY_ADDRESS=auto dynstore score-all shop --engine ray --json
    """
    if workers is not None and engine != "ray":
        raise click.UsageError("--workers needs --engine ray")
    with _open(store) as s:
        out = s.score_all(k, engine=engine, workers=workers, precision=precision)
    if as_json:
        click.echo(to_json(out.to_dict()))
    elif not quiet:
        on = f"ray, {out.workers} worker{'s' * (out.workers != 1)}" if out.workers else out.engine
        click.echo(f"{out.users} users scored: {out.rows} rows of version {out.version} in batch_recommendations "
                   f"({out.seconds}s, {out.users_per_s} users/s, {on}, precision {out.precision})")


# -------------------------------------------------------------------------- recommend


# recommend reads titles and checks the user on the Lance tables themselves: a SQL
# session (views, functions, macros) would cost it a tenth of its start-up


def _lance_literal(value) -> str:
    return str(int(value)) if isinstance(value, int) else "'" + str(value).replace("'", "''") + "'"


def _title_map(s, ids):
    items = s.catalog.dataset("items")
    name = next((c for c in ("title", "name") if items is not None and c in items.schema.names), None)
    if not name or not ids:
        return None
    rows = items.to_table(columns=["item_id", name],
                          filter=f"item_id IN ({', '.join(_lance_literal(i) for i in ids)})").to_pylist()
    return {r["item_id"]: r[name] for r in rows}


def _coerce_id(s, kind: str, raw: str):
    if s.catalog.id_types().get(kind) == "int":
        try:
            return int(raw)
        except ValueError:
            raise click.BadParameter(f"{raw!r}: this store's {kind} ids are integers") from None
    return raw


def _known_user(s, uid) -> bool:
    """Whether ``uid`` is in users or has interactions."""
    for name in ("users", "interactions"):
        ds = s.catalog.dataset(name)
        if ds is not None and ds.count_rows(filter=f"user_id = {_lance_literal(uid)}"):
            return True
    return False


def _unknown_user(user_id: str, strict: bool, quiet: bool) -> None:
    from dynstore.errors import DynstoreError

    what = f"user {user_id!r} is in neither users nor interactions"
    if strict:
        raise DynstoreError(f"{what} (--strict); leave --strict out for the cold-start list")
    _note(quiet, f"note: {what}: this is the cold-start list (popular, fitting items); --strict makes it an error")


@main.command(cls=StoreCommand)
@store_argument
@click.argument("user_id")
@click.option("-k", type=click.IntRange(1, 10_000), default=10, show_default=True, help="How many items.")
@click.option("--version", "version", type=click.IntRange(min=1), default=None,
              help="Embedding version (default: current).")
@click.option("--log-impressions", is_flag=True, help="Log the list as shown, for the next refresh.")
@click.option("--strict", is_flag=True,
              help="An unknown USER_ID (in neither users nor interactions) is an error, not the cold-start list.")
@format_options
@quiet_option
@handle_errors
def recommend(store: str, user_id, k, version, log_impressions, strict, fmt, as_json, quiet):
    """Top-k items for USER_ID (unknown users get the cold-start list).

    A user in neither users nor interactions (a typo?) gets the cold-start
    list with a note on stderr; --strict makes it an error (exit 1).

    \b
    Examples:
      dynstore recommend shop 42
      dynstore recommend shop 42 -k 5 --version 2 --json
      dynstore recommend shop u-0042 --format csv --log-impressions
    """
    with _open(store) as s:
        uid = _coerce_id(s, "user", user_id)
        if not _known_user(s, uid):
            _unknown_user(user_id, strict, quiet)
        recs = s.recommend(uid, k, version=version)
        titles = _title_map(s, [r.item_id for r in recs])
        columns = ["rank", "item_id", "score"] + (["title"] if titles is not None else [])
        rows = [(n, r.item_id, round(r.score, 6)) + ((titles.get(r.item_id),) if titles is not None else ())
                for n, r in enumerate(recs, 1)]
        click.echo(render(columns, rows, output_format(fmt, as_json)))
        if log_impressions:  # the list is shown even if logging it fails (a one-line error, exit non-zero)
            s.log_impressions(uid, [r.item_id for r in recs])


# -------------------------------------------------------------------------- sql


def _sql_store_given(pos: list[str]) -> bool:
    return len(pos) >= 2 or (len(pos) == 1 and is_store(pos[0]))


def _param_value(raw: str):
    """A ``-p`` value: an integer or a number when it reads as one, else text."""
    for kind in (int, float):
        try:
            return kind(raw)
        except ValueError:
            pass
    return raw


@main.command(cls=StoreCommand, store_given=_sql_store_given)
@store_argument
@click.argument("query", required=False)
@click.option("-f", "--file", "files", multiple=True, type=click.Path(dir_okay=False, allow_dash=True),
              help="Run the statements and dot commands of FILE ('-': stdin), as a script; repeatable.")
@click.option("-p", "--param", "params", nargs=2, multiple=True, metavar="NAME VALUE",
              help="Value of the named parameter $NAME (an integer or number when VALUE reads as one); repeatable.")
@click.option("--keep-going", is_flag=True,
              help="A script runs past a failing statement (and still exits 1); default: it stops there.")
@click.option("--read-only", is_flag=True, help="No writes to the store, no file access outside it.")
@format_options
@quiet_option
@handle_errors
def sql(store: str, query, files, params, keep_going, read_only, fmt, as_json, quiet):
    """Run QUERY with every dynstore view and function, or a script, or open a prompt.

    QUERY may hold several statements; each result is printed. A script
    (QUERY, -f FILE, or SQL piped to stdin) runs like the DuckDB CLI's: the
    first failing statement stops it with exit 1, its error showing DuckDB's
    LINE and caret (--keep-going runs the rest). Tables you CREATE live in
    this command's (or prompt's) memory only; the store's own tables are
    read-only in SQL (use ingest and delete). Ctrl-C cancels a running query.
    The prompt (when stdin is a terminal) has DuckDB-style dot commands
    (.help lists them: .read, .output, .maxrows, .maxwidth ...) and keeps
    multi-line statements whole in its history (~/.dynstore_history, or
    $DYNSTORE_HISTORY).

    \b
    Examples:
      dynstore sql shop "SELECT recommend(42, 10)"
      dynstore sql shop "SELECT r.rank, i.title FROM recommendations(42, 5) r JOIN items i USING (item_id)"
      dynstore sql shop --read-only --format csv "SELECT * FROM versions"
      dynstore sql shop -f report.sql --format csv --no-headers
      dynstore sql shop 'SELECT * FROM recommendations($user, 10)' -p user 42
      printf 'SELECT 1;\\nSELECT 2;\\n' | dynstore sql shop
      dynstore sql shop            # interactive: .tables, .schema items, .mode csv, .timer on
    """
    from dynstore.sql.session import SqlSession

    from dynstore.cli.output import setting
    from dynstore.cli.repl import Repl

    if query is not None and files:
        raise click.UsageError("give QUERY or -f FILE, not both")
    with _open(store, read_only=read_only) as s, \
            SqlSession(s, {name: _param_value(value) for name, value in params}) as session:
        repl = Repl(session, output_format(fmt, as_json), quiet=quiet, keep_going=keep_going,
                    headers=not setting("no_headers", False), max_width=setting("max_width", None))
        if query is None and not files:
            repl.loop()
        else:
            try:
                for path in files:
                    if not _run_file(repl, path) and not keep_going:
                        break
                if query is not None:
                    repl.run_script(query.splitlines(keepends=True))
            finally:
                repl.finish()
    if repl.failed:
        sys.exit(EXIT_USER)


def _run_file(repl, path: str) -> bool:
    """Run one -f FILE through ``repl``; False when a statement of it failed."""
    from dynstore.errors import DynstoreError

    if path == "-":
        return repl.run_script(iter(sys.stdin.readline, ""))
    try:
        with open(path, encoding="utf-8") as f:
            lines = f.readlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise DynstoreError(f"-f {path}: {getattr(exc, 'strerror', None) or exc}") from None
    return repl.run_script(lines)


# -------------------------------------------------------------------------- delete


@main.command(cls=StoreCommand, store_given=_kind_first)
@store_argument
@click.argument("kind", type=click.Choice(KINDS))
@click.option("--where", required=True, metavar="SQL",
              help="Condition over the table's columns (interactions also have label), as in `dynstore sql`.")
@click.option("--dry-run", is_flag=True, help="Count the matching rows; delete nothing.")
@json_option()
@quiet_option
@handle_errors
def delete(store: str, kind, where, dry_run, as_json, quiet):
    """Delete the rows of a table matching --where, in one commit.

    A deleted item is never recommended again, at once, and its vectors
    leave the next version; interactions that name it stay as history until
    you delete them too.

    \b
    Examples:
      dynstore delete shop interactions --where "ts < DATE '2024-01-01'"
      dynstore delete shop items --where "item_id IN ('sku-1', 'sku-2')" --dry-run
      dynstore delete shop users --where "region IS NULL"
    """
    with _open(store) as s:
        out = s.delete(kind, where, dry_run=dry_run)
    if as_json:
        click.echo(to_json(out.to_dict()))
    elif dry_run:
        click.echo(f"would delete {out.deleted} of {_rows(out.total)} from {kind} (dry run: nothing deleted)")
    elif not quiet:
        click.echo(f"deleted {_rows(out.deleted)} from {kind} ({out.total} left, dataset version {out.version})")
        if kind == "items" and out.deleted:
            _note(quiet, "note: interactions naming the deleted items stay; remove them with "
                         "`dynstore delete STORE interactions --where \"item_id NOT IN (SELECT item_id FROM items)\"`")


# -------------------------------------------------------------------------- compact


@main.command(cls=StoreCommand)
@store_argument
@click.option("--retain-seconds", type=click.FloatRange(min=0), default=None,
              help="Keep dataset versions superseded less than this long ago (what a running statement or "
                   "a pinned connection may still read) [default: the config's retain_seconds, 3600].")
@json_option()
@quiet_option
@handle_errors
def compact(store: str, retain_seconds, as_json, quiet):
    """Merge small fragments and drop old dataset versions and orphans.

    Every ingest and logged impression adds a fragment, every refresh a
    version's embeddings, every rewrite leaves the previous files for
    readers still on them. Writers compact a dataset by themselves once it
    has more than compact_fragments fragments (see `dynstore config`); this
    command does every dataset now. It also removes the leftovers of a
    refresh killed before its commit (embedding rows, model files).
    It never leaves the store larger than it found it: with a retention
    (--retain-seconds above 0) it keeps what readers may still read and
    merges no fragments (a merge would keep both copies); it prints what
    it reclaimed and what it kept.

    \b
    Examples:
      dynstore compact shop
      dynstore compact shop --retain-seconds 60 --json
    """
    with _open(store) as s:
        out = s.compact(retain_seconds=retain_seconds)
    if as_json:
        click.echo(to_json(out.to_dict()))
        return
    if quiet:
        return
    for name, d in out.datasets.items():
        click.echo(f"{name}: {d['fragments'][0]} -> {d['fragments'][1]} fragments, {d['versions'][0]} -> "
                   f"{d['versions'][1]} versions, {d['bytes'][0]:,} -> {d['bytes'][1]:,} bytes")
    orphans = out.orphans
    if orphans.get("embedding_rows") or orphans.get("files"):
        click.echo(f"removed orphans of unfinished versions: {orphans['embedding_rows']} embedding rows, "
                   f"{len(orphans['files'])} files")
    if out.encoders_removed:
        click.echo(f"removed unused fine-tuned encoders: {', '.join(out.encoders_removed)}")
    for name, why in out.skipped.items():
        _note(quiet, f"note: skipped {name}: {why}")
    _report_reclaimed(out)


def _report_reclaimed(out) -> None:
    """What compact freed, and what it kept for readers that may still read it."""
    before, after = out.bytes
    click.echo(f"reclaimed {out.reclaimed:,} bytes (store {before:,} -> {after:,} bytes)")
    versions = sum(k["versions"] for k in out.kept.values())
    unmerged = {name: k["fragments"] for name, k in out.kept.items() if k["fragments"]}
    if versions:
        click.echo(f"kept {versions} older dataset version(s) superseded less than {out.retain_seconds:g} s ago "
                   "(readers may still read them)")
    if unmerged:
        click.echo(f"fragments not merged in {', '.join(unmerged)} (a merge keeps both copies for "
                   f"{out.retain_seconds:g} s); --retain-seconds 0 merges them and drops every older version: "
                   "use it when no reader is open")


# -------------------------------------------------------------------------- inspect


@main.command(cls=StoreCommand)
@store_argument
@format_options
@quiet_option
@handle_errors
def inspect(store: str, fmt, as_json, quiet):
    """What is in the store and what it needs: counts, sizes, versions, refresh.

    Rows, bytes on disk and Lance fragments of each table, the semantic
    cache and the embeddings; the encoder; stale items (they need encode);
    the versions and the last refresh; and what `dynstore refresh` would do
    now (retrain, and why, or nothing). Reads only.

    \b
    Examples:
      dynstore inspect shop
      dynstore inspect shop --json | jq .refresh
    """
    with _open(store, read_only=True) as s:
        out = s.inspect()
    click.echo(key_values(out.to_dict(), output_format(fmt, as_json)))


# -------------------------------------------------------------------------- refresh


def _finetune_steps_help() -> str:
    from dynstore.model import finetune as ft

    return (f"Fine-tuning steps of {ft.BATCH} events [default: one pass over the positives, at most "
            f"{ft.MAX_STEPS_CPU} on a CPU, {ft.MAX_STEPS_GPU} on a GPU].")


@main.command(cls=StoreCommand)
@store_argument
@click.option("--since", default=DEFAULT_SINCE, show_default=True, help="Training window: 30d, 12w, 48h, a date, or 'all'.")
@click.option("--epochs", type=click.IntRange(min=1), default=None,
              help="Most training epochs [default: 10]; training stops early once the holdout stops improving.")
@click.option("--no-promote", is_flag=True, help="Keep the new version as a candidate.")
@click.option("--force", is_flag=True, help="Retrain even when nothing changed since the last version.")
@click.option("--finetune-encoder", is_flag=True,
              help="Also fine-tune the last layers of the text encoder on the same events, then re-encode "
                   "every item (minutes on a CPU; uses the GPU when there is one).")
@click.option("--finetune-steps", cls=LazyHelpOption, lazy_help=_finetune_steps_help,
              type=click.IntRange(min=1), default=None)
@click.option("--seed", type=int, default=0, show_default=True, help="Random seed of the training run.")
@json_option("Print the result as JSON (stable, for cron and scripts).")
@quiet_option
@handle_errors
def refresh(store: str, since, epochs, no_promote, force, finetune_encoder, finetune_steps, seed, as_json, quiet):
    """Retrain from recent positives and negatives; publish a new version.

    A refresh does nothing (exit 0) when nothing changed since the last
    version: no new or deleted interactions, same items, window, labelling
    rules, item document and encoder. It then says so; --force retrains
    anyway. With --finetune-encoder the store switches to the fine-tuned
    encoder only if the version is promoted.

    \b
    Examples:
      dynstore refresh shop
      dynstore refresh shop --since all --epochs 5 --json
      dynstore refresh shop --force
      dynstore refresh shop --finetune-encoder --finetune-steps 200
    """
    if finetune_steps is not None and not finetune_encoder:
        raise click.UsageError("--finetune-steps needs --finetune-encoder")
    with _open(store) as s:
        out = s.refresh(since=since, epochs=epochs, promote=not no_promote, finetune_encoder=finetune_encoder,
                        finetune_steps=finetune_steps, seed=seed, force=force, progress=show_progress(quiet))
    if as_json:
        click.echo(to_json(out.to_dict()))
    elif not quiet:
        _report_refresh(out)


def _report_refresh(out: RefreshResult) -> None:
    """The text report of a refresh: the verdict, metrics, holdout, a published rule, a fine-tune."""
    if out.noop:
        click.echo(f"nothing to do: {out.reason}")
        return
    if out.reasons:
        click.echo(f"retrained: {'; '.join(out.reasons)}")
    if out.status == "unchanged":
        click.echo(f"no new version: {out.reason}")
    else:
        click.echo(f"version {out.version}: {out.status}"
                   + (" (training did not clearly beat its start on the holdout: same weights)"
                      if out.kept_start else ""))
    for name, m in (out.metrics.to_dict() if out.metrics else {}).items():
        if isinstance(m, dict):
            click.echo(f"  {name:<10} " + "  ".join(f"{k}={v:.4f}" for k, v in m.items() if isinstance(v, float)))
    if out.holdout:
        click.echo(f"  holdout    {out.holdout['events']} events, judged on {out.holdout['judged_on']}")
    if out.published:
        click.echo(f"version {out.published['version']}: current (the {out.published['kind']}: it beat version "
                   f"{out.parent} on the holdout and version {out.version} did not)")
    ft = out.finetune
    if ft:
        kept = "now the store's encoder" if out.status == "current" else "not used (version not promoted)"
        click.echo(f"  encoder    {ft['encoder']} ({ft['steps']} steps, loss {ft['loss_before']:.4f} -> "
                   f"{ft['loss_after']:.4f}); {kept}")


# -------------------------------------------------------------------------- versions, rollback, eval


@main.command(cls=StoreCommand)
@store_argument
@format_options
@quiet_option
@handle_errors
def versions(store: str, fmt, as_json, quiet):
    """List embedding versions: serving status, refresh's verdict, window, holdout metrics.

    choices: each weight refresh chose (the item-item gamma, the content prior,
    leaving the start) with its gain in NDCG@10, standard error and the users
    that judged it (all of it under metrics.train.selection with --json).

    status is where a version stands now (current, retired, candidate,
    rejected); verdict is what refresh decided when it was made (initial,
    promoted, passed, rejected, rule) and survives rollbacks.

    \b
    Examples:
      dynstore versions shop
      dynstore versions shop --format markdown
      dynstore versions shop --json | jq '.[0].metrics'
    """
    from dynstore.storage.registry import choices, headline_metrics

    with _open(store, read_only=True) as s:
        rows = [r.to_dict() for r in s.versions()]
    fmt = output_format(fmt, as_json)
    if fmt in ("json", "jsonl"):
        click.echo(render(list(rows[0]) if rows else [], [list(r.values()) for r in rows], fmt))
        return
    cols = ["version", "status", "verdict", "parent", "created", "train_window", "ndcg@10", "recall@10", "auc",
            "choices"]
    body = []
    for r in rows:
        m = headline_metrics(r)
        body.append([r["version"], r["status"], r["verdict"], r["parent"], str(r["created"])[:19], r["train_window"],
                     *(round(m[k], 4) if isinstance(m.get(k), float) else None for k in cols[-4:-1]),
                     choices(r) or None])
    click.echo(render(cols, body, fmt))


@main.command(cls=StoreCommand)
@store_argument
@click.argument("version", type=click.IntRange(min=1))
@json_option()
@quiet_option
@handle_errors
def rollback(store: str, version, as_json, quiet):
    """Make VERSION the current embedding version again.

    The version that was current becomes retired; every version keeps its
    verdict. Rolling back to a version refresh rejected works, with a warning.

    \b
    Examples:
      dynstore rollback shop 3
      dynstore versions shop && dynstore rollback shop 1 --json
    """
    with _open(store) as s:
        out = s.rollback(version)
    if as_json:
        click.echo(to_json(out.to_dict()))
        return
    if not quiet:
        click.echo(f"version {out.version} is current (was {out.previous})")
    if out.warning:
        _note(quiet, f"warning: {out.warning}")


@main.command(name="eval", cls=StoreCommand)
@store_argument
@click.option("--version", "version", type=click.IntRange(min=1), default=None,
              help="Version to evaluate (default: current).")
@click.option("-k", type=click.IntRange(1, 10_000), default=10, show_default=True,
              help="Cut-off of recall@k and ndcg@k.")
@click.option("--since", default="all", show_default=True,
              help="Read only this window (30d, 12w, a date, or 'all'): the slice is its newest 10%.")
@format_options
@quiet_option
@handle_errors
def eval_(store: str, version, k, since, fmt, as_json, quiet):
    """Evaluate a version on the newest 10% of all interactions (of --since).

    The output's slice says which events were used and how many of them
    the version was trained on. refresh judges on the newest 10% of its
    --since window, and only on events the current version never saw, so
    its figures for the same version differ. On a long history, --since
    bounds what is read (and the memory) to the window.

    \b
    Examples:
      dynstore eval shop
      dynstore eval shop --version 3 -k 20 --json
      dynstore eval shop --since 30d
    """
    with _open(store, read_only=True) as s:
        out = s.evaluate(version=version, k=k, since=since)
    click.echo(key_values(out.to_dict(), output_format(fmt, as_json)))
    sl = out.slice
    _note(quiet or as_json or fmt != "table",
          f"note: judged on {sl['events']} events of {sl['users']} users from {sl['from']} to {sl['to']} (the newest "
          f"{sl['share']:.0%} of {sl['of']}), {sl['trained_on_share']:.0%} of which version {out.version} "
          "was trained on; refresh uses its own window and only unseen events, so its figures differ")


# -------------------------------------------------------------------------- config


def _config_view(cfg) -> dict:
    d = cfg.as_dict()
    d.pop("encoder_fingerprint", None)  # a cache key, not a setting
    return d


@main.command(cls=StoreCommand)
@store_argument
@click.option("--positive", default=None, help="SQL rule labelling a positive interaction.")
@click.option("--negative", default=None, help="SQL rule labelling a negative interaction.")
@click.option("--item-text", default=None, help="SQL expression over item columns rendering the item document.")
@click.option("--behaviour-summary/--no-behaviour-summary", default=None,
              help="Append a summary of recent behaviour to item documents.")
@click.option("--model", default=None, help="Encoder: 'minilm', 'fake[:DIM]', or a local Hugging Face path.")
@click.option("--max-length", type=click.IntRange(min=2), default=None, help="Encoder max tokens per document.")
@click.option("--compact-fragments", type=click.IntRange(min=0), default=None,
              help="Writers compact a dataset with more fragments than this (0: only `dynstore compact`).")
@click.option("--retain-seconds", type=click.IntRange(min=0), default=None,
              help="Compaction keeps dataset versions superseded less than this long ago.")
@click.option("--precision", type=click.Choice(PRECISIONS), default=None, help=PRECISION_HELP)
@format_options
@quiet_option
@handle_errors
def config(store: str, fmt, as_json, quiet, **changes):
    """Show or change the store's rules, item document and encoder.

    A change of the labelling rules, the item document or the encoder makes
    the next refresh retrain (and say why).

    \b
    Examples:
      dynstore config shop
      dynstore config shop --positive "event IN ('click', 'purchase')"
      dynstore config shop --item-text "title || ': ' || description" --json
      dynstore config shop --behaviour-summary
    """
    changes = {k: v for k, v in changes.items() if v is not None}
    with _open(store, read_only=not changes) as s:
        cfg = s.configure(**changes) if changes else s.config
    if changes and quiet and not as_json:
        return
    if changes and not as_json:
        view = _config_view(cfg)  # one line: what changed, as the config now says it
        click.echo("set " + "; ".join(f"{k} = {to_json(view.get(k, v), indent=None)}" for k, v in changes.items()))
    else:
        click.echo(key_values(_config_view(cfg), output_format(fmt, as_json)))
    if changes.keys() & {"positive", "negative", "item_text", "behaviour_summary", "model", "max_length", "precision"}:
        _note(quiet or as_json, "note: the next `dynstore refresh` retrains on the new settings "
                                "(items whose document changed are re-encoded first)")


# -------------------------------------------------------------------------- demo


@main.command()
@click.argument("directory", required=False, type=click.Path(file_okay=False))
@click.option("--size", type=click.Choice(SIZES), default="small", show_default=True,
              help="Sample shop size (tiny runs in seconds).")
@click.option("--model", default="minilm", show_default=True, help="Encoder for the demo store ('fake' is fastest).")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of the generated data.")
@quiet_option
@handle_errors
def demo(directory, size, model, seed, quiet):
    """Build a sample shop store in DIRECTORY and show it working end to end.

    DIRECTORY must be new, empty, or an earlier demo's (which is rebuilt);
    anything else is refused. Without it a temporary directory is used.

    \b
    Examples:
      dynstore demo
      dynstore demo /tmp/shop-demo --size tiny --model fake
    """
    from dynstore.demo import run_demo

    run_demo(directory, size=size, model=model, seed=seed, echo=(lambda s: None) if quiet else click.echo,
             progress=show_progress(quiet))


if __name__ == "__main__":  # pragma: no cover
    main()
