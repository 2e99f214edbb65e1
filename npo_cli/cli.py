"""The command line: parse, validate, call, print. No logic lives here."""

from __future__ import annotations

import json
import os
import sys
from typing import Optional

import typer
from rich.console import Console
from rich.table import Table

from npo_cli import __version__
from npo_cli.errors import NpoError

app = typer.Typer(
    help="npo: RLVR with GRPO, a content-addressed checkpoint store, and Near-Future Policy Optimization.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)
recipe_app = typer.Typer(help="Inspect recipe settings.", no_args_is_help=True)
app.add_typer(recipe_app, name="recipe")
console = Console()

StoreOpt = typer.Option(None, "--store", help="Store URL (default: $NPO_STORE, else ./checkpoints).")
JsonOpt = typer.Option(False, "--json", help="Machine-readable output.")


def _version(value: bool):
    if value:
        print(f"npo {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: Optional[bool] = typer.Option(None, "--version", callback=_version, is_eager=True,
                                           help="Print the version and exit."),
):
    pass


@recipe_app.command("schema")
def recipe_schema(as_json: bool = JsonOpt):
    """Every recipe setting with its type, default and description."""
    from npo_cli.recipe import schema_rows

    rows = schema_rows()
    if as_json:
        print(json.dumps([dict(zip(("key", "type", "default", "description"), r)) for r in rows], indent=1))
        return
    table = Table("key", "type", "default", "description")
    for r in rows:
        table.add_row(*r)
    console.print(table)


def main():
    try:
        app()
    except NpoError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(1)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        sys.exit(130)
    except Exception as e:  # never a traceback for the user; NPO_DEBUG=1 shows it
        if os.environ.get("NPO_DEBUG"):
            raise
        msg = str(e).splitlines()[0] if str(e) else ""
        print(f"error: {type(e).__name__}: {msg} (set NPO_DEBUG=1 for the traceback)", file=sys.stderr)
        sys.exit(1)
