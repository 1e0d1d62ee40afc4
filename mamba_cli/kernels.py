"""`mamba kernels status|build`: which compiled kernels exist for this machine, and building them."""

from __future__ import annotations

import json
from typing import Annotated

import typer

from .common import command, err

app = typer.Typer(help="Compiled kernels: what is built and in use, and building ahead of time.", no_args_is_help=True)


def _report(build: bool) -> list[dict]:
    """One entry per compiled backend: available or not, and why."""
    import torch

    from mamba_core import kernels

    rows = []
    try:
        module = kernels.load_cpu(build=build)
        rows.append({"backend": "cpu-kernels", "device": "cpu", "status": "built", "path": getattr(module, "__file__", None), "reason": None,
                     "threads": module.parallel_threads()})  # 1 where built without OpenMP (see README, limitations)
    except RuntimeError as exc:
        rows.append({"backend": "cpu-kernels", "device": "cpu", "status": "unavailable", "path": None, "reason": str(exc)})
    try:
        module = kernels.load_cuda(build=build)
        rows.append({"backend": "cuda-kernels", "device": f"cuda ({torch.cuda.get_device_name()})", "status": "built",
                     "path": getattr(module, "__file__", None), "reason": None})
    except RuntimeError as exc:
        rows.append({"backend": "cuda-kernels", "device": "cuda", "status": "unavailable", "path": None, "reason": str(exc)})
    rows.append({"backend": "torch", "device": "cpu" + (", cuda" if torch.cuda.is_available() else ""), "status": "always", "path": None,
                 "reason": "the plain-torch reference (used when no compiled backend can run)"})
    return rows


def _print(rows: list[dict], json_out: bool) -> None:
    from mamba_core.kernels import cache_dir

    if json_out:
        print(json.dumps({"cache_dir": str(cache_dir()), "backends": rows}))
        return
    for r in rows:
        detail = r["path"] or r["reason"] or ""
        if "threads" in r:
            detail = f"{r['threads']} threads, {detail}"
        print(f"{r['backend']:<12} {r['device']:<10} {r['status']:<12} {detail}")
    print(f"cache: {cache_dir()}")


@app.command("status")
@command
def status(json_out: Annotated[bool, typer.Option("--json", help="One JSON object.")] = False) -> None:
    """Say which compiled kernels are built for this machine and why any is not in use (builds nothing)."""
    _print(_report(build=False), json_out)


@app.command("build")
@command
def build(json_out: Annotated[bool, typer.Option("--json", help="One JSON object.")] = False) -> None:
    """Compile the kernels for this machine now (otherwise they are compiled on first use)."""
    rows = _report(build=True)
    _print(rows, json_out)
    if any(r["status"] == "unavailable" for r in rows):
        err("Warning: some kernels could not be built; the plain-torch ops will be used for them")
