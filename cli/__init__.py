"""The ``dynstore`` command line: a thin layer over the Python API.

Each command opens the store, calls one API method and formats the result;
a :class:`~dynstore.DynstoreError` becomes a one-line message and exit code
1 (3 when the store is busy). Progress goes to stderr, results to stdout.
"""
from __future__ import annotations

import functools
import json
import os
import sys
from pathlib import Path

import click

from dynstore import finetune as _ft  # constants only: torch loads when fine-tuning starts

__all__ = ["main"]

EXIT_USER, EXIT_USAGE, EXIT_BUSY = 1, 2, 3


def _api():
    import dynstore

    return dynstore


def handle_errors(fn):
    """Turn DynstoreError into ``Error: <message>`` and an exit code."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        from dynstore.errors import DynstoreError, StoreBusy

        try:
            return fn(*args, **kwargs)
        except StoreBusy as exc:
            click.echo(f"Error: {exc}", err=True)
            sys.exit(EXIT_BUSY)
        except DynstoreError as exc:
            click.echo(f"Error: {exc}", err=True)
            sys.exit(EXIT_USER)

    return wrapper


def _json(obj) -> str:
    return json.dumps(obj, indent=2, default=str)


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
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
    """


@main.command()
@click.argument("store", type=click.Path(file_okay=False))
@click.option("--model", default=None, help="Encoder: 'minilm' (default, bundled), 'fake', or a local Hugging Face path.")
@click.option("--positive", default=None, help="SQL rule labelling a positive interaction (default: value > 0).")
@click.option("--negative", default=None, help="SQL rule labelling a negative interaction (default: value <= 0).")
@click.option("--item-text", default=None, help="SQL expression over item columns rendering the item document.")
@click.option("--max-length", type=int, default=None, help="Encoder max tokens per document (default 256).")
@handle_errors
def init(store, model, positive, negative, item_text, max_length):
    """Create a new store in STORE (a new or empty directory).

    \b
    Examples:
      dynstore init shop
      dynstore init shop --positive "event IN ('click','purchase')" --negative "event = 'skip'"
      dynstore init films --item-text "title || ' ' || genres" --model ./my-bert
    """
    s = _api().init(store, positive=positive, negative=negative, item_text=item_text, model=model,
                    max_length=max_length)
    click.echo(f"created store {s.path} (positive: {s.config.positive}; negative: {s.config.negative}; "
               f"encoder: {s.config.model})")


def _parse_map(pairs) -> dict[str, str]:
    out = {}
    for p in pairs:
        new, sep, old = p.partition("=")
        if not sep or not new or not old:
            raise click.BadParameter(f"{p!r}: expected NEW=OLD", param_hint="--map")
        out[new] = old
    return out


@main.command()
@click.argument("store", type=click.Path(file_okay=False))
@click.argument("kind", type=click.Choice(["interactions", "items", "users"]))
@click.argument("files", nargs=-1, required=True, type=click.Path())
@click.option("--map", "mapping", multiple=True, metavar="NEW=OLD", help="Rename a column of the files (repeatable).")
@click.option("--format", "fmt", type=click.Choice(["csv", "tsv", "parquet", "json", "ndjson"]), default=None,
              help="Override format detection from the file extension.")
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")
@handle_errors
def ingest(store, kind, files, mapping, fmt, as_json):
    """Load FILES into a table: interactions are appended, items/users upserted.

    All files land in one commit, or none does: a bad row rejects the whole
    command with a message naming file, row and column.

    \b
    Examples:
      dynstore ingest shop items items.csv
      dynstore ingest shop interactions day1.parquet day2.parquet
      dynstore ingest films interactions ratings.csv --map user_id=userId --map item_id=movieId --map ts=timestamp --map value=rating
    """
    with _api().connect(store) as s:
        out = s.ingest(kind, list(files), mapping=_parse_map(mapping), format=fmt)
    if as_json:
        click.echo(_json(out))
    else:
        click.echo(f"ingested {out['rows']} rows into {kind} ({out['total']} in total, dataset version {out['version']})")


@main.command()
@click.argument("store", type=click.Path(file_okay=False))
@click.option("--all", "all_", is_flag=True, help="Re-encode every item, not just stale ones.")
@click.option("--batch-size", type=int, default=64, show_default=True)
@click.option("--device", type=click.Choice(["cpu", "cuda"]), default=None, help="Default: cuda when present.")
@click.option("--json", "as_json", is_flag=True)
@handle_errors
def encode(store, all_, batch_size, device, as_json):
    """Encode stale items (new or changed documents) into semantic vectors.

    \b
    Examples:
      dynstore encode shop
      dynstore encode shop --all --device cuda --json
    """
    with _api().connect(store) as s:
        out = s.encode(all=all_, batch_size=batch_size, device=device, progress=not as_json)
    if as_json:
        click.echo(_json(out))
    else:
        rate = f", {out['items_per_s']} docs/s" if out["encoded"] else ""
        click.echo(f"{out['items']} items: {out['stale']} stale, {out['encoded']} documents encoded, "
                   f"{out['reused']} reused from cache ({out['seconds']}s{rate}, {out['device']})")
        if out.get("version"):
            click.echo(f"created version {out['version']} (untrained fusion)")


def _title_map(s, ids):
    cols = [r[0] for r in s.sql("DESCRIBE items").fetchall()]
    name = next((c for c in ("title", "name") if c in cols), None)
    if not name or not ids:
        return {}
    rows = s.sql(f'SELECT item_id, "{name}" FROM items WHERE item_id IN (SELECT unnest(?))', [ids]).fetchall()
    return dict(rows)


def _coerce_id(s, kind: str, raw: str):
    if s.config.id_types.get(kind) == "int":
        try:
            return int(raw)
        except ValueError:
            raise click.BadParameter(f"{raw!r}: this store's {kind} ids are integers") from None
    return raw


@main.command()
@click.argument("store", type=click.Path(file_okay=False))
@click.argument("user_id")
@click.option("-k", type=int, default=10, show_default=True, help="How many items (1-10000).")
@click.option("--version", "version", type=int, default=None, help="Embedding version (default: current).")
@click.option("--log-impressions", is_flag=True, help="Log the list as shown, for the next refresh.")
@click.option("--json", "as_json", is_flag=True)
@handle_errors
def recommend(store, user_id, k, version, log_impressions, as_json):
    """Top-k items for USER_ID (unknown users get the cold-start list).

    \b
    Examples:
      dynstore recommend shop 42
      dynstore recommend shop 42 -k 5 --version 2 --json
    """
    with _api().connect(store) as s:
        uid = _coerce_id(s, "user", user_id)
        recs = s.recommend(uid, k, version=version)
        if log_impressions:
            s.log_impressions(uid, [r["item_id"] for r in recs])
        titles = _title_map(s, [r["item_id"] for r in recs])
    if as_json:
        click.echo(_json([{"rank": n + 1, **r, "title": titles.get(r["item_id"])} for n, r in enumerate(recs)]))
        return
    for n, r in enumerate(recs, 1):
        title = titles.get(r["item_id"])
        click.echo(f"{n:>3}  {r['item_id']!s:>10}  {r['score']:.4f}  {title or ''}")


def _print_rel(rel, fmt: str):
    if rel is None:
        return
    cols = rel.columns
    rows = rel.fetchall()
    if fmt == "json":
        click.echo(_json([dict(zip(cols, r)) for r in rows]))
    elif fmt == "csv":
        import csv

        w = csv.writer(sys.stdout)
        w.writerow(cols)
        w.writerows(rows)
    else:
        click.echo(_table(cols, rows))


def _table(cols, rows, limit: int = 60) -> str:
    def cell(v):
        text = "NULL" if v is None else str(v)
        return text if len(text) <= limit else text[: limit - 1] + "…"

    body = [[cell(v) for v in r] for r in rows]
    widths = [max([len(c)] + [len(r[i]) for r in body]) for i, c in enumerate(cols)]
    line = "  ".join(c.ljust(w) for c, w in zip(cols, widths))
    out = [line, "  ".join("-" * w for w in widths)]
    out += ["  ".join(v.ljust(w) for v, w in zip(r, widths)) for r in body]
    out.append(f"({len(rows)} row{'s' if len(rows) != 1 else ''})")
    return "\n".join(out)


@main.command()
@click.argument("store", type=click.Path(file_okay=False))
@click.argument("query", required=False)
@click.option("--read-only", is_flag=True, help="No writes to the store, no file access outside it.")
@click.option("--format", "fmt", type=click.Choice(["table", "csv", "json"]), default="table", show_default=True)
@handle_errors
def sql(store, query, read_only, fmt):
    """Run QUERY with every dynstore view and function, or open a prompt.

    \b
    Examples:
      dynstore sql shop "SELECT recommend(42, 10)"
      dynstore sql shop "SELECT r.rank, i.title FROM recommendations(42, 5) r JOIN items i USING (item_id)"
      dynstore sql shop --read-only --format csv "SELECT * FROM versions"
      dynstore sql shop            # interactive, with history
    """
    import duckdb

    with _api().connect(store, read_only=read_only) as s:
        if query is not None:
            try:
                _print_rel(s.sql(query), fmt)
            except duckdb.Error as exc:
                click.echo(f"Error: {_first_line(exc)}", err=True)
                sys.exit(EXIT_USER)
            return
        _repl(s, fmt)


def _first_line(exc) -> str:
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__


def _repl(s, fmt):
    import duckdb

    history = Path(os.environ.get("DYNSTORE_HISTORY", Path.home() / ".dynstore_history"))
    if sys.stdin.isatty():
        from prompt_toolkit import PromptSession
        from prompt_toolkit.history import FileHistory

        session = PromptSession(history=FileHistory(str(history)))
        read = lambda: session.prompt("dynstore> ")  # noqa: E731
    else:
        read = lambda: input()  # noqa: E731
    click.echo(f"dynstore SQL on {s.path}; end statements with ';', quit with .quit or Ctrl-D", err=True)
    buf = ""
    while True:
        try:
            line = read()
        except (EOFError, KeyboardInterrupt):
            break
        if line.strip() in (".quit", ".exit", "\\q"):
            break
        buf += line + "\n"
        if not buf.strip().endswith(";"):
            continue
        try:
            _print_rel(s.sql(buf), fmt)
        except duckdb.Error as exc:
            click.echo(f"Error: {_first_line(exc)}", err=True)
        buf = ""


@main.command()
@click.argument("store", type=click.Path(file_okay=False))
@click.option("--since", default="30d", show_default=True, help="Training window: 30d, 12w, a date, or 'all'.")
@click.option("--epochs", type=click.IntRange(min=1), default=None,
              help="Most training epochs [default: 10]; training stops early once the holdout stops improving.")
@click.option("--no-promote", is_flag=True, help="Keep the new version as a candidate.")
@click.option("--finetune-encoder", is_flag=True,
              help="Also fine-tune the last layers of the text encoder on the same events, then re-encode "
                   "every item (minutes on a CPU; uses the GPU when there is one).")
@click.option("--finetune-steps", type=click.IntRange(min=1), default=None,
              help=f"Fine-tuning steps of {_ft.BATCH} events [default: one pass over the positives, "
                   f"at most {_ft.MAX_STEPS_CPU} on a CPU, {_ft.MAX_STEPS_GPU} on a GPU].")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--json", "as_json", is_flag=True)
@handle_errors
def refresh(store, since, epochs, no_promote, finetune_encoder, finetune_steps, seed, as_json):
    """Retrain from recent positives and negatives; publish a new version.

    A refresh with no new interactions since the last one does nothing and
    exits 0, so it is safe to run from cron. With --finetune-encoder the
    store switches to the fine-tuned encoder only if the version is promoted.

    \b
    Examples:
      dynstore refresh shop
      dynstore refresh shop --since all --epochs 5 --json
      dynstore refresh shop --finetune-encoder --finetune-steps 200
    """
    if finetune_steps is not None and not finetune_encoder:
        raise click.UsageError("--finetune-steps needs --finetune-encoder")
    with _api().connect(store) as s:
        out = s.refresh(since=since, epochs=epochs, promote=not no_promote, finetune_encoder=finetune_encoder,
                        finetune_steps=finetune_steps, seed=seed, progress=not as_json)
    if as_json:
        click.echo(_json(out))
        return
    if out.get("status") == "noop":
        click.echo(f"nothing to do: {out.get('reason')}")
        return
    click.echo(f"version {out['version']}: {out['status']}")
    for name, m in out.get("metrics", {}).items():
        if isinstance(m, dict):
            click.echo(f"  {name:<10} " + "  ".join(f"{k}={v:.4f}" for k, v in m.items() if isinstance(v, float)))
    judged = out.get("holdout")
    if judged:
        click.echo(f"  holdout    {judged['events']} events, judged on {judged['judged_on']}")
    pub = out.get("published")
    if pub:
        click.echo(f"version {pub['version']}: current (the {pub['kind']}, recounted on the window: "
                   f"it beat version {out['parent']} on the holdout and version {out['version']} did not)")
    ft = out.get("finetune")
    if ft:
        kept = "now the store's encoder" if out["status"] == "current" else "not used (version not promoted)"
        click.echo(f"  encoder    {ft['encoder']} ({ft['steps']} steps, loss {ft['loss_before']:.4f} -> "
                   f"{ft['loss_after']:.4f}); {kept}")


@main.command()
@click.argument("store", type=click.Path(file_okay=False))
@click.option("--json", "as_json", is_flag=True)
@handle_errors
def versions(store, as_json):
    """List embedding versions with their status and metrics."""
    with _api().connect(store) as s:
        rows = s.versions()
    if as_json:
        click.echo(_json(rows))
        return
    if not rows:
        click.echo("no versions yet; run `dynstore encode`")
        return
    cols = ["version", "status", "parent", "created", "train_window", "metrics"]
    body = []
    for r in rows:
        m = r["metrics"].get("candidate", r["metrics"]) if isinstance(r["metrics"], dict) else {}
        short = " ".join(f"{k}={v:.3f}" for k, v in m.items() if isinstance(v, float))
        body.append([r["version"], r["status"], r["parent"], str(r["created"])[:19], r["train_window"], short])
    click.echo(_table(cols, body, limit=80))


@main.command()
@click.argument("store", type=click.Path(file_okay=False))
@click.argument("version", type=int)
@handle_errors
def rollback(store, version):
    """Make VERSION the current embedding version again."""
    with _api().connect(store) as s:
        out = s.rollback(version)
    click.echo(f"version {out['version']} is current (was {out['previous']})")


@main.command(name="eval")
@click.argument("store", type=click.Path(file_okay=False))
@click.option("--version", "version", type=int, default=None)
@click.option("-k", type=int, default=10, show_default=True)
@click.option("--json", "as_json", is_flag=True)
@handle_errors
def eval_(store, version, k, as_json):
    """Evaluate a version (default: current) on the latest slice of interactions."""
    from dynstore.refresh import evaluate_version

    with _api().connect(store) as s:
        out = evaluate_version(s, version=version, k=k)
    if as_json:
        click.echo(_json(out))
    else:
        click.echo(f"version {out['version']} on {out['n_users']} users: " +
                   "  ".join(f"{key}={v:.4f}" for key, v in out.items() if isinstance(v, float)))


@main.command()
@click.argument("store", type=click.Path(file_okay=False))
@click.option("--positive", default=None)
@click.option("--negative", default=None)
@click.option("--item-text", default=None)
@click.option("--behaviour-summary/--no-behaviour-summary", default=None,
              help="Append a summary of recent behaviour to item documents.")
@click.option("--model", default=None)
@click.option("--max-length", type=int, default=None)
@handle_errors
def config(store, **changes):
    """Show or change the store's rules, item document and encoder.

    \b
    Examples:
      dynstore config shop
      dynstore config shop --item-text "title || ': ' || description"
      dynstore config shop --behaviour-summary
    """
    with _api().connect(store) as s:
        changes = {k: v for k, v in changes.items() if v is not None}
        cfg = s.configure(**changes) if changes else s.config
    for key, val in cfg.as_dict().items():
        click.echo(f"{key} = {val}")


@main.command()
@click.argument("directory", required=False, type=click.Path(file_okay=False))
@click.option("--size", default="small", show_default=True, help="Sample size: tiny, small, medium.")
@click.option("--model", default="minilm", show_default=True, help="Encoder for the demo store.")
@click.option("--seed", type=int, default=0, show_default=True)
@handle_errors
def demo(directory, size, model, seed):
    """Build a sample shop store in DIRECTORY and show it working end to end.

    \b
    Examples:
      dynstore demo
      dynstore demo /tmp/shop-demo --size tiny
    """
    from dynstore.demo import run_demo

    run_demo(directory, size=size, model=model, seed=seed, echo=click.echo)


if __name__ == "__main__":  # pragma: no cover
    main()
