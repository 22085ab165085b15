"""The ``flashmoe`` command line. Each command lives in its own module; this file only wires them."""
from __future__ import annotations

import sys

import click

from flashmoe.errors import FlashMoEError


class _Group(click.Group):
    """A click group that turns FlashMoEError, click's usage errors and a few OS errors into one
    line on stderr and a non-zero exit (never a traceback)."""

    def main(self, *args, **kwargs):
        kwargs.setdefault("standalone_mode", True)
        try:
            return super().main(*args, **{**kwargs, "standalone_mode": False})
        except click.exceptions.Exit as e:
            sys.exit(e.exit_code)
        except click.exceptions.Abort:
            click.echo("aborted", err=True)
            sys.exit(130)
        except click.UsageError as e:
            where = f" ({e.ctx.command_path})" if e.ctx is not None else ""
            click.echo(f"error: {e.format_message()}{where}", err=True)
            sys.exit(2)
        except click.ClickException as e:
            click.echo(f"error: {e.format_message()}", err=True)
            sys.exit(e.exit_code)

    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except FlashMoEError as e:
            click.echo(f"error: {e}", err=True)
            sys.exit(e.exit_code)
        except FileNotFoundError as e:
            click.echo(f"error: no such file: {e.filename or e}", err=True)
            sys.exit(1)
        except KeyboardInterrupt:
            click.echo("interrupted", err=True)
            sys.exit(130)


@click.group(cls=_Group)
@click.version_option(package_name="flashmoe")
def main():
    """flashmoe: run MoE GGUF models larger than RAM on a patched llama.cpp."""


def _register():
    from flashmoe import commands

    for cmd in commands.all_commands():
        main.add_command(cmd)


_register()
