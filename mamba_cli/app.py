"""The Typer application behind the `mamba` console script."""

from __future__ import annotations

import typer

from . import bench as _bench
from . import convert as _convert
from . import eval_ppl as _eval_ppl
from . import generate as _generate
from . import kernels as _kernels

app = typer.Typer(
    name="mamba",
    help="Run Mamba language models: generate text, evaluate perplexity, convert and benchmark.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)


def _version(value: bool) -> None:
    if value:
        from mamba_core import __version__

        print(f"mamba {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: bool = typer.Option(False, "--version", callback=_version, is_eager=True, help="Print the version and exit."),
) -> None:
    """Run Mamba language models: generate text, evaluate perplexity, convert and benchmark."""


app.command("generate", epilog=_generate.EXAMPLES)(_generate.generate)
app.command("eval-ppl", epilog=_eval_ppl.EXAMPLES)(_eval_ppl.eval_ppl)
app.command("convert", epilog=_convert.EXAMPLES)(_convert.convert)
app.command("bench", epilog=_bench.EXAMPLES)(_bench.bench)
app.add_typer(_kernels.app, name="kernels")


def main() -> None:
    """Console-script entry point."""
    app()
