"""The HF `config.json`: derived from Megatron's training args, or taken from the user (--hf-config)."""

from __future__ import annotations

import argparse
import json
import logging
import shutil
from pathlib import Path
from typing import Any

from ..dtypes import DType
from ..errors import CheckpointError, OptionError
from ..families import Family
from ..files.small_files import JSON_LIMIT, read_small_text
from ..plan.rules import Dims
from .hf_fields import hf_value, normalized

__all__ = ["HF_SIDE_FILES", "copy_side_files", "derive_config", "dims_of", "finalize_config", "load_config"]

log = logging.getLogger(__name__)

# Files of an HF model directory that travel with the weights.
HF_SIDE_FILES = (
    "generation_config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "tokenizer.model",
    "vocab.json",
    "merges.txt",
    "added_tokens.json",
    "chat_template.jinja",
    "chat_template.json",
)


def _arg(args: argparse.Namespace, name: str) -> Any:
    value = getattr(args, name, None)
    if value is None:
        raise CheckpointError(f"the checkpoint's args have no {name!r}; pass --hf-config to describe the model")
    return value


def _check_supported(args: argparse.Namespace, family: Family) -> None:
    """Refuse args whose model the family cannot express, instead of writing a wrong one."""
    problems = family.decoder.problems(args, family.name)
    if problems:
        raise CheckpointError("the checkpoint's model is not supported: " + "; ".join(problems))


def derive_config(args: argparse.Namespace | None, family: Family, *, vocab_size: int | None) -> dict[str, Any]:
    """config.json fields from Megatron-LM's args (what `save_pretrained` would write for the same model)."""
    if args is None:
        raise CheckpointError(
            "the checkpoint has no Megatron args (common.pt) and no run_config.yaml model: section; pass --hf-config"
        )
    _check_supported(args, family)
    heads = _arg(args, "num_attention_heads")
    hidden = _arg(args, "hidden_size")
    if vocab_size is None:
        vocab_size = getattr(args, "vocab_size", None)
    if vocab_size is None:
        vocab_size = _arg(args, "padded_vocab_size")
        log.warning("args carry no true vocab size; keeping the padded %d rows (pass --vocab-size to trim)", vocab_size)
    config = {
        "architectures": [family.architecture],
        "model_type": family.model_type,
        "hidden_size": hidden,
        "intermediate_size": _arg(args, "ffn_hidden_size"),
        "num_hidden_layers": _arg(args, "num_layers"),
        "num_attention_heads": heads,
        "num_key_value_heads": _arg(args, "num_query_groups")
        if getattr(args, "group_query_attention", False)
        else heads,
        "head_dim": getattr(args, "kv_channels", None) or hidden // heads,
        **family.decoder.fields(args),  # norm, activation, rotary embedding
        "max_position_embeddings": getattr(args, "max_position_embeddings", None) or _arg(args, "seq_length"),
        "vocab_size": vocab_size,
        "tie_word_embeddings": not getattr(args, "untie_embeddings_and_output_weights", False),
        "attention_dropout": 0.0,
        "initializer_range": float(getattr(args, "init_method_std", 0.02)),
        "use_cache": True,
    }
    config.update(family.config)
    config.update(family.from_args(args))
    return config


def load_config(path: str | Path) -> tuple[dict[str, Any], Path | None]:
    """Read `--hf-config`: a config.json, or an HF model directory (returned for its side files)."""
    path = Path(path)
    model_dir = path if path.is_dir() else None
    file = path / "config.json" if model_dir else path
    text = read_small_text(file, JSON_LIMIT, "--hf-config JSON config", OptionError)
    try:
        config = json.loads(text)
    except (ValueError, RecursionError) as exc:
        raise OptionError(f"--hf-config {file}: cannot read a JSON config ({exc})") from exc
    if not isinstance(config, dict):
        raise OptionError(f"--hf-config {file}: not a JSON object")
    return config, model_dir


def finalize_config(config: dict[str, Any], dtype: DType, *, vocab_size: int | None) -> dict[str, Any]:
    """The config as written: dtype of the weights, and an explicit --vocab-size if one was given."""
    config = dict(config)
    text_config = hf_value(config, "text_config", None)
    if vocab_size is not None and isinstance(text_config, dict):  # a vision-language config
        config["text_config"] = {**text_config, "vocab_size": vocab_size}
    elif vocab_size is not None:
        config["vocab_size"] = vocab_size
    config["torch_dtype"] = config["dtype"] = dtype.torch_name
    return config


def dims_of(config: dict[str, Any], family: Family) -> Dims:
    """The dimensions the rules need; `Dims.config` is the text model's config with every alias filled."""
    config = normalized(family.text_config(config))
    try:
        heads = int(hf_value(config, "num_attention_heads"))
        hidden = int(hf_value(config, "hidden_size"))
        num_experts, moe_layers = family.experts(config)
        return Dims(
            num_layers=int(hf_value(config, "num_hidden_layers")),
            hidden_size=hidden,
            num_heads=heads,
            num_query_groups=int(hf_value(config, "num_key_value_heads", None) or heads),
            head_dim=int(hf_value(config, "head_dim", None) or hidden // heads),
            vocab_size=int(hf_value(config, "vocab_size")),
            tied=bool(hf_value(config, "tie_word_embeddings", False)),  # these families default to untied
            num_experts=num_experts,
            moe_layers=moe_layers,
            num_mtp_layers=family.mtp_layers(config),
            config=config,
        )
    except (KeyError, TypeError, ValueError) as exc:
        raise OptionError(f"HF config lacks a usable field ({exc}); it must describe a decoder-only LM") from exc


def copy_side_files(model_dir: Path, out_dir: Path) -> list[str]:
    """Copy tokenizer files and generation_config.json from an HF model directory."""
    copied = []
    for name in HF_SIDE_FILES:
        if (model_dir / name).is_file():
            shutil.copyfile(model_dir / name, out_dir / name)
            copied.append(name)
    return copied
