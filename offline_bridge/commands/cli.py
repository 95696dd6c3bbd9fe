"""The `offline-bridge` command line: click options onto `convert`, errors onto one line and an exit code."""

from __future__ import annotations

import logging
import os
import signal
import sys
from collections.abc import Callable

from .interrupts import Interrupted, exit_while_loading, ignore_signals, interrupt_on_signals, is_command

if is_command():  # Ctrl-C while the modules below load (half a second) is one line, not a traceback
    exit_while_loading()

import click

from ..families import FAMILIES
from .cli_checks import diff_command, inspect_command, verify_command
from .convert import convert
from .export_adapter import export_adapter
from .options import MAX_WORKERS
from .outcome import internal_error, report
from .parts import finalize

__all__ = ["entry", "main", "run"]

_NO_ARGS = getattr(click.exceptions, "NoArgsIsHelpError", ())  # click >= 8.2


def entry() -> None:
    """The console script: `run`, then the process ends at once. Everything was written, flushed (fsync)
    and renamed before; only the interpreter's teardown is skipped, which takes 0.3 s once torch is loaded."""
    interrupt_on_signals()
    code = run(sys.argv[1:])
    ignore_signals()  # done: a late Ctrl-C cannot turn the result into a traceback
    logging.shutdown()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except BrokenPipeError:  # `offline-bridge inspect ... | head`: the reader has all it wanted
            pass
    os._exit(code)


def run(argv: list[str]) -> int:
    """The command line ``argv`` run to its exit code; whatever goes wrong is one line on stderr."""
    try:
        return _invoke(argv)
    except KeyboardInterrupt as exc:  # also while another error is being reported
        interrupted = exc if isinstance(exc, Interrupted) else Interrupted(signal.SIGINT)
        click.echo(f"error: {interrupted}", err=True)
        return interrupted.exit_code


def _invoke(argv: list[str]) -> int:
    try:
        with main.make_context("offline-bridge", argv) as ctx:
            main.invoke(ctx)
    except SystemExit as exc:
        if exc.code is None or isinstance(exc.code, int):
            return exc.code or 0
        click.echo(exc.code, err=True)
        return 1
    except click.exceptions.Exit as exc:  # --help, --version
        return exc.exit_code
    except _NO_ARGS as exc:  # `offline-bridge` alone: the help
        exc.show()
        return exc.exit_code
    except click.ClickException as exc:  # a usage error: one line, without the usage text
        click.echo(f"error: {exc.format_message()}", err=True)
        return exc.exit_code
    except click.Abort:
        raise KeyboardInterrupt from None
    except Exception as exc:  # raised outside a command's `report`
        click.echo(internal_error(exc), err=True)
        return 1
    return 0


@click.group()
@click.version_option(package_name="offline-bridge")
@click.option("--debug", is_flag=True, help="Show an error's traceback instead of one line.")
@click.pass_context
def main(ctx: click.Context, debug: bool) -> None:
    """Convert Megatron-Core checkpoints to Hugging Face checkpoints, offline."""
    ctx.obj = {"debug": debug}


@main.command("convert")
@click.argument("ckpt_dir", type=click.Path(path_type=str))
@click.argument("out_dir", type=click.Path(path_type=str))
@click.option(
    "--hf-config",
    type=click.Path(path_type=str),
    help="config.json or HF model directory (tokenizer and generation_config are copied too). "
    "Default: derived from the checkpoint's Megatron args.",
)
@click.option("--model-type", type=click.Choice(sorted(FAMILIES)), help="Model family; inferred when omitted.")
@click.option("--iteration", help="Iteration to convert (a number or 'release'); default: the latest.")
@click.option(
    "--dtype",
    type=click.Choice(["auto", "bf16", "fp16", "fp32"]),
    default="auto",
    show_default=True,
    help="Output dtype; auto keeps the stored one.",
)
@click.option(
    "--max-shard-size",
    default="5GB",
    show_default=True,
    help="Largest safetensors file, decimal units like transformers (5GB = 5·10⁹ bytes).",
)
@click.option("--vocab-size", type=int, help="True vocabulary size, to trim Megatron's padding when args lack it.")
@click.option(
    "--adapter", type=click.Path(path_type=str), help="Megatron-Bridge LoRA checkpoint to merge into CKPT_DIR."
)
@click.option(
    "--base",
    type=click.Path(path_type=str),
    help="Base checkpoint when CKPT_DIR is adapter-only (default: run_config.yaml's pretrained_checkpoint).",
)
@click.option("--lora-alpha", type=float, help="LoRA alpha (default: run_config.yaml peft.alpha).")
@click.option("--lora-dim", type=int, help="LoRA rank (default: run_config.yaml peft.dim).")
@click.option("--device", default="auto", show_default=True, help="Where LoRA merges run: auto, cpu or cuda[:N].")
@click.option(
    "--export-fp8",
    is_flag=True,
    help="Write linears with ModelOpt amax as FP8-E4M3 + weight_scale / input_scale (compressed-tensors).",
)
@click.option(
    "--workers",
    type=int,
    help=f"Threads overlapping reads, merges and writes, 1 to {MAX_WORKERS} (default: the CPU count, at most 4).",
)
@click.option(
    "--check-crc",
    is_flag=True,
    help="Check every record read against the CRC-32 its torch.save archive holds (about 0.16 s of CPU per GB).",
)
@click.option(
    "--strict",
    is_flag=True,
    help="Refuse legacy tensors that differ between TP ranks but should be replicated (default: take TP rank 0's).",
)
@click.option("--dry-run", is_flag=True, help="Print the plan (tensors, files, bytes) without reading tensor data.")
@click.option(
    "--part",
    metavar="I/N",
    help="Write only part I (0 to N-1) of N of the output files, beside OUT_DIR; `finalize OUT_DIR` completes it.",
)
@click.option("--resume", is_flag=True, help="Keep the files a killed run (or part) completed; write the rest.")
@click.option(
    "--ray",
    is_flag=False,
    flag_value="",
    metavar="[ADDRESS]",
    help="Run the parts as Ray tasks on the cluster at ADDRESS (default: RAY_ADDRESS or a local one), then finalize.",
)
@click.option("--overwrite", is_flag=True, help="Replace OUT_DIR if it is not empty.")
@click.option("--quiet", "-q", is_flag=True, help="No progress bar or log messages.")
def convert_command(ckpt_dir: str, out_dir: str, quiet: bool, **options: object) -> None:
    """Convert the Megatron checkpoint CKPT_DIR into a Hugging Face checkpoint in OUT_DIR.

    CKPT_DIR is a save root (with latest_checkpointed_iteration.txt) or an iter_XXXXXXX / release
    directory. OUT_DIR receives config.json and model*.safetensors (+ model.safetensors.index.json).
    Exit codes: 0 done, 2 bad input or options, 1 internal error.
    """
    _write(convert, ckpt_dir, out_dir, quiet, options)


def _log_to_stderr(quiet: bool) -> None:
    """Log lines on stderr: INFO and up, or only warnings with --quiet."""
    logging.basicConfig(level=logging.WARNING if quiet else logging.INFO, format="%(levelname)s %(message)s")


def _write(command: Callable[..., object], source: str, out_dir: str, quiet: bool, options: dict[str, object]) -> None:
    """Run a command that writes OUT_DIR; errors become one line on stderr and the exit code."""
    _log_to_stderr(quiet)
    report(lambda: command(source, out_dir, progress=not quiet, **options))


@main.command("export-adapter")
@click.argument("adapter_ckpt", type=click.Path(path_type=str))
@click.argument("out_dir", type=click.Path(path_type=str))
@click.option(
    "--hf-config",
    type=click.Path(path_type=str),
    help="config.json or HF model directory of the target model (default: the base checkpoint's args).",
)
@click.option(
    "--base",
    type=click.Path(path_type=str),
    help="Base checkpoint whose args describe the model (default: run_config.yaml's pretrained_checkpoint).",
)
@click.option("--base-model-name-or-path", help="Recorded in adapter_config.json.")
@click.option("--model-type", type=click.Choice(sorted(FAMILIES)), help="Model family; inferred when omitted.")
@click.option("--iteration", help="Iteration to export (a number or 'release'); default: the latest.")
@click.option("--dtype", type=click.Choice(["auto", "bf16", "fp16", "fp32"]), default="auto", show_default=True)
@click.option("--lora-alpha", type=float, help="LoRA alpha (default: run_config.yaml peft.alpha).")
@click.option("--lora-dim", type=int, help="LoRA rank (default: run_config.yaml peft.dim).")
@click.option(
    "--expert-format",
    type=click.Choice(["paramwrapper", "per-expert"]),
    default="paramwrapper",
    show_default=True,
    help="Experts as PEFT ParamWrapper tensors on fused experts, or per expert (v4).",
)
@click.option("--overwrite", is_flag=True, help="Replace OUT_DIR if it is not empty.")
@click.option("--quiet", "-q", is_flag=True, help="No progress bar or log messages.")
def export_adapter_command(adapter_ckpt: str, out_dir: str, quiet: bool, **options: object) -> None:
    """Export the Megatron-Bridge adapter ADAPTER_CKPT as a PEFT adapter in OUT_DIR, reading no base weights.

    Writes adapter_model.safetensors and adapter_config.json.
    """
    _write(export_adapter, adapter_ckpt, out_dir, quiet, options)


@main.command("finalize")
@click.argument("out_dir", type=click.Path(path_type=str))
@click.option("--overwrite", is_flag=True, help="Replace OUT_DIR if it is not empty.")
@click.option("--quiet", "-q", is_flag=True, help="No log messages.")
def finalize_command(out_dir: str, overwrite: bool, quiet: bool) -> None:
    """Put OUT_DIR in place from the parts `convert --part I/N` wrote beside it, once every part is present
    and intact: the manifest is written and the output renamed into place, as one `convert` would have."""
    _log_to_stderr(quiet)
    report(lambda: finalize(out_dir, overwrite=overwrite))


for _command in (inspect_command, diff_command, verify_command):
    main.add_command(_command)
