"""The `offline-bridge` commands that read and check but write no output: `inspect`, `diff`, `verify`.
Registered on the command group in `cli`."""

from __future__ import annotations

import sys

import click

from .options import check_options
from .outcome import as_json, report

__all__ = ["diff_command", "inspect_command", "verify_command"]


@click.command("inspect")
@click.argument("ckpt_dir", type=click.Path(path_type=str))
@click.option("--iteration", help="Iteration to inspect (a number or 'release'); default: the latest.")
@click.option("--json", "json_output", is_flag=True, help="Print the report as JSON.")
def inspect_command(ckpt_dir: str, iteration: str | None, json_output: bool) -> None:
    """Describe the Megatron checkpoint CKPT_DIR from its metadata alone: format, iterations, parallel
    layout, args, model family, adapter, and every tensor's shape, dtype, bytes and chunks. Exit 0; 1 when the
    report lists problems `convert` would refuse (`error` lines); 2 when the checkpoint cannot be read."""
    from .inspection import format_report, inspect_checkpoint

    def described() -> tuple[str, bool]:
        check_options(iteration=iteration)
        found = inspect_checkpoint(ckpt_dir, iteration)
        return (as_json(found) if json_output else format_report(found)), bool(found["errors"])

    text, refused = report(described)
    click.echo(text)
    sys.exit(1 if refused else 0)


@click.command("diff")
@click.argument("a", type=click.Path(path_type=str))
@click.argument("b", type=click.Path(path_type=str))
@click.option("--atol", type=float, default=0.0, show_default=True, help="Absolute tolerance.")
@click.option("--rtol", type=float, default=0.0, show_default=True, help="Relative tolerance (to B's values).")
@click.option("--json", "json_output", is_flag=True, help="Print the per-tensor report as JSON.")
def diff_command(a: str, b: str, atol: float, rtol: float, json_output: bool) -> None:
    """Compare two models tensor by tensor; A and B are HF directories or Megatron checkpoints (compared
    by the HF tensors they convert to). Exit 0 when equal within |a-b| <= atol + rtol*|b|, else 1."""
    from .diff import as_json as diff_json
    from .diff import diff, format_diff, identical

    def compared() -> tuple[str, bool]:
        results = diff(a, b, atol=atol, rtol=rtol)
        text = as_json(diff_json(a, b, atol, rtol, results)) if json_output else format_diff(results)
        return text, identical(results)

    text, same = report(compared)
    click.echo(text)
    sys.exit(0 if same else 1)


@click.command("verify")
@click.argument("out_dir", type=click.Path(path_type=str))
def verify_command(out_dir: str) -> None:
    """Check OUT_DIR (written by convert or export-adapter) against its offline-bridge.json: every file's
    size and hash, every tensor's sha256. Exit 0 intact, 1 on any mismatch, 2 without a readable manifest."""
    from ..write.manifest import verify

    problems = report(lambda: verify(out_dir))
    for problem in problems:
        click.echo(problem)
    click.echo(f"{out_dir}: {'intact' if not problems else f'{len(problems)} mismatch(es)'}")
    sys.exit(1 if problems else 0)
