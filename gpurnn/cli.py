"""The `gpurnn` command line: thin click commands that parse, call the library, and report.

Every problem a user can fix ends the program with one line on stderr and exit code 2 (no traceback;
`--debug` or GPURNN_DEBUG=1 shows one).
"""

import json
import os
import sys
from importlib.metadata import PackageNotFoundError, version

import click

from .backend import get_backend
from .errors import GpurnnError
from .registry import Registry


def debug_requested():
    return "--debug" in sys.argv[1:] or os.environ.get("GPURNN_DEBUG") == "1"


def package_version(name):
    try:
        return version(name)
    except PackageNotFoundError:
        return None


def emit_json(obj):
    click.echo(json.dumps(obj, indent=2, sort_keys=False))


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--backend", type=click.Choice(["auto", "numpy", "cupy"]), default=None,
              help="Array backend [default: $GPURNN_BACKEND or auto: CuPy when a CUDA device is usable].")
@click.option("--plugin", "plugins", multiple=True, metavar="MODULE",
              help="Load a layer plugin: a module name or a .py path (repeatable; also $GPURNN_PLUGINS).")
@click.option("--debug", is_flag=True, help="Show tracebacks on errors.")
@click.version_option(package_name="gpurnn")
@click.pass_context
def cli(ctx, backend, plugins, debug):
    """gpurnn: readable recurrent language models on NumPy (CPU) and CuPy (GPU)."""
    ctx.obj = {"backend": backend, "plugins": plugins}


def registry_from(ctx):
    return Registry(plugins=ctx.obj["plugins"])


def backend_from(ctx):
    return get_backend(ctx.obj["backend"])


@cli.command()
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@click.pass_context
def info(ctx, as_json):
    """Versions, the chosen backend and why, and the device."""
    backend = backend_from(ctx)
    report = {"gpurnn": package_version("gpurnn"), "python": sys.version.split()[0],
              **{pkg: package_version(pkg) for pkg in ("click", "pluggy", "h5py")},
              **backend.describe()}
    if as_json:
        emit_json(report)
        return
    for key, value in report.items():
        click.echo(f"{key:>20}: {value}")


@cli.command()
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@click.pass_context
def plugins(ctx, as_json):
    """Every layer type, the plugin that provides it, and what it does."""
    rows = [{"type": t.name, "plugin": t.plugin, "description": t.description}
            for t in registry_from(ctx).layer_types.values()]
    if as_json:
        emit_json(rows)
        return
    width = max((len(r["type"]) for r in rows), default=4)
    pwidth = max((len(r["plugin"]) for r in rows), default=6)
    for r in rows:
        click.echo(f"{r['type']:<{width}}  {r['plugin']:<{pwidth}}  {r['description']}")


def main(argv=None):
    """Entry point: run the CLI, turning user errors into one line and exit code 2."""
    try:
        cli.main(args=argv, prog_name="gpurnn", standalone_mode=False)
    except click.exceptions.Exit as exc:
        return exc.exit_code
    except click.Abort:
        click.echo("aborted", err=True)
        return 130
    except (GpurnnError, click.ClickException) as exc:
        if debug_requested():
            raise
        message = exc.format_message() if isinstance(exc, click.ClickException) else str(exc)
        click.echo(f"gpurnn: error: {message}", err=True)
        return 2
    except KeyboardInterrupt:
        click.echo("interrupted", err=True)
        return 130
    return 0
