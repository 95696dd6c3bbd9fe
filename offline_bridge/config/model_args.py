"""Where the model's configuration comes from when no `--hf-config` is given: one internal form (Megatron-LM's
args names) whatever the checkpoint saved, checked against the args schema, with its source recorded.

Sources, first found wins:
1. Megatron-LM's `args`: in `common.pt` (torch_dist, zarr), in `.metadata`'s `common_state` (core 0.19) or
   top-level DCP objects (torch_dcp), or in every `model_optim_rng.pt` (legacy torch);
2. Megatron-Bridge's `run_config.yaml` (iteration directory or its parent): the `model:` provider section,
   translated by `provider_args`.
For a base plus adapter, the base is asked first, then the adapter save (whose run config describes the
model it was trained on).
"""

from __future__ import annotations

import argparse
import logging
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from ..errors import CheckpointError
from ..readers import CheckpointReader, LegacyReader
from ..readers.base import TensorInfo
from ..readers.combined import CombinedReader
from .args_schema import checked_args
from .provider_args import provider_args
from .run_config import RunConfig, load_run_config

__all__ = ["ARGS_SOURCES", "ModelArgs", "find_model_args", "model_args_of"]

log = logging.getLogger(__name__)

# what `ModelArgs.source` may say, in the order the sources are tried
ARGS_SOURCES = ("common.pt args", ".metadata common_state args", "model_optim_rng.pt args", "run_config.yaml model:")
EMBEDDING = "embedding.word_embeddings.weight"
PROVIDER_CORE = ("num_layers", "hidden_size")  # fields every provider dump has


@dataclass(frozen=True)
class ModelArgs:
    """The model's Megatron args (checked), where they were read and the HF model a Bridge run names."""

    args: argparse.Namespace
    source: str  # one of ARGS_SOURCES
    file: Path
    hf_model: str | None = None  # `model.hf_model_id`, else the HF tokenizer's `tokenizer_model`: shown, never fetched

    def describe(self) -> str:
        hint = f", from HF model {self.hf_model}" if self.hf_model else ""
        return f"{self.source} ({self.file}{hint})"


def _hf_model(run_config: RunConfig) -> str | None:
    """Where Bridge records the HF model a run started from (a hint for the user only)."""
    tokenizer = run_config.tokenizer or {}
    hints = [(run_config.model or {}).get("hf_model_id")]
    if tokenizer.get("tokenizer_type") == "HuggingFaceTokenizer":
        hints.append(tokenizer.get("tokenizer_model"))
    return next((h for h in hints if isinstance(h, str) and 0 < len(h) <= 256), None)


def _saved_args(reader: CheckpointReader) -> ModelArgs | None:
    args = reader.args
    if args is None:
        return None
    if isinstance(reader, LegacyReader):
        source, file = (
            "model_optim_rng.pt args",
            min(reader.path.glob("mp_rank_*/model_optim_rng.pt"), default=reader.path),
        )
    elif (reader.path / "common.pt").is_file():
        source, file = "common.pt args", reader.path / "common.pt"
    else:
        source, file = ".metadata common_state args", reader.path / ".metadata"
    return ModelArgs(checked_args(args, str(file)), source, file)


def _run_config_args(directory: Path, tensors: Mapping[str, TensorInfo]) -> ModelArgs | None:
    """The provider's args; Bridge's `vocab_size` is the tokenizer's, the embedding's rows the padded size."""
    run_config = load_run_config(directory)
    if run_config is None or not all(name in (run_config.model or {}) for name in PROVIDER_CORE):
        return None  # no model: section, or one with only parallel sizes (not a provider dump)
    where = str(run_config.file)
    args = checked_args(provider_args(run_config.model, where), where)
    embedding = tensors.get(EMBEDDING)
    if embedding is not None and embedding.shape:
        args.padded_vocab_size = embedding.shape[0]
    return ModelArgs(args, "run_config.yaml model:", run_config.file, _hf_model(run_config))


def find_model_args(reader: CheckpointReader) -> ModelArgs | None:
    """The model's args from the checkpoint alone, or None when it saved neither args nor a run config."""
    readers = [reader.base, reader.adapter] if isinstance(reader, CombinedReader) else [reader]
    for candidate in readers:
        found = _saved_args(candidate) or _run_config_args(candidate.path, reader.tensors)
        if found is not None:
            log.info("model configuration: %s", found.describe())
            return found
    return None


def model_args_of(reader: CheckpointReader) -> ModelArgs:
    """`find_model_args`, required: without it the user must describe the model."""
    found = find_model_args(reader)
    if found is None:
        raise CheckpointError(
            f"{reader.path}: the checkpoint has no Megatron args (common.pt) and no run_config.yaml with a model: "
            "section; pass --hf-config"
        )
    return found
