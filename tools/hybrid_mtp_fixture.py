"""A tiny megatron-core 0.19 ``HybridModel`` checkpoint WITH multi-token prediction, written on CPU (Python 3.12
venv only: ``/work/venv312/bin/python tools/hybrid_mtp_fixture.py tests/data/hybrid_mtp``).

megatron-core 0.16 (the CI venv) has no MTP in its MambaModel, so this script writes a committed vector instead
of a cached fixture. One TP1 gloo rank builds ``HybridModel`` with the unified pattern ``M*-E/*E`` (main layers
``M*-E``, one MTP depth whose inner layers are ``*E``), saves it as Megatron-LM 0.19's training loop does
(``dist_checkpointing.save`` of the model's sharded state dict with ``args`` / ``iteration`` as common state),
loads it back and records Megatron's own fp32 forward: the main ``logits`` and the MTP depth's ``mtp_logits``
(the MTP block's hidden states through the shared output layer, captured with a forward hook).

The Mamba kernel substitutes, local (no Transformer Engine) layer specs with TE-fused key names and the MoE
randomisation are tools/mamba_fixtures.py's; the MTP block uses torch RMSNorm for ``enorm`` / ``hnorm`` /
``final_layernorm`` and a ColumnParallelLinear ``eh_proj`` (TE's names on disk are the same).
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tools import mamba_fixtures as mf
from tools.megatron_fixtures import REFERENCE_BATCH, REFERENCE_SEQ, SEQ_LENGTH, _crc_seed

__all__ = ["MAIN", "MTP", "main"]

MAIN, MTP = "M*-E", "*E"  # main layers; the inner layers of the one MTP depth
PATTERN = f"{MAIN}/{MTP}"
SPEC = mf.MambaSpec(  # small enough to commit (~0.2 MB)
    pattern=MAIN,
    vocab_size=128,
    hidden_size=32,
    ffn_hidden_size=32,
    num_attention_heads=4,
    mamba_num_heads=4,
    moe_ffn_hidden_size=16,
    moe_shared_expert_intermediate_size=16,
    moe_latent_size=16,
)


def _patch() -> None:
    from megatron.core.models.hybrid import hybrid_block
    from megatron.core.transformer.torch_norm import WrappedTorchNorm

    mf._patch_mamba_kernels()
    hybrid_block.TENorm = WrappedTorchNorm  # the final norm


def _stack_spec():
    from megatron.core.models.hybrid.hybrid_block import HybridStack, HybridStackSubmodules
    from megatron.core.tensor_parallel import ColumnParallelLinear
    from megatron.core.transformer.multi_token_prediction import (
        MultiTokenPredictionBlock,
        MultiTokenPredictionBlockSubmodules,
        MultiTokenPredictionLayer,
        MultiTokenPredictionLayerSubmodules,
    )
    from megatron.core.transformer.spec_utils import ModuleSpec
    from megatron.core.transformer.torch_norm import WrappedTorchNorm

    mamba = mf._stack_spec(SPEC).submodules
    layer = ModuleSpec(
        module=MultiTokenPredictionLayer,
        submodules=MultiTokenPredictionLayerSubmodules(
            enorm=WrappedTorchNorm,
            hnorm=WrappedTorchNorm,
            eh_proj=ColumnParallelLinear,
            mtp_model_layer=None,
            layer_norm=WrappedTorchNorm,
        ),
    )
    mtp = ModuleSpec(
        module=MultiTokenPredictionBlock, submodules=MultiTokenPredictionBlockSubmodules(layer_specs=[layer])
    )
    return ModuleSpec(
        module=HybridStack,
        submodules=HybridStackSubmodules(
            mamba_layer=mamba.mamba_layer,
            attention_layer=mamba.attention_layer,
            mlp_layer=mamba.mlp_layer,
            moe_layer=mamba.moe_layer,
            mtp_block_spec=mtp,
        ),
    )


def _build():
    import torch
    from megatron.core.models.hybrid.hybrid_model import HybridModel

    config = mf._config(SPEC, 1)
    config.mtp_num_layers = 1
    config.mtp_loss_scaling_factor = 0.1
    torch.manual_seed(_crc_seed(SPEC.seed, mf.FAMILY, "init"))
    model = HybridModel(
        config=config,
        hybrid_stack_spec=_stack_spec(),
        vocab_size=SPEC.padded_vocab_size,
        max_sequence_length=SEQ_LENGTH,
        hybrid_layer_pattern=PATTERN,
        share_embeddings_and_output_weights=False,
        position_embedding_type="none",
    )
    with torch.no_grad():
        for pname, p in model.named_parameters():
            if "norm" in pname and pname.endswith("weight") and ".mixer." not in pname:
                gen = torch.Generator().manual_seed(_crc_seed(SPEC.seed, mf.FAMILY, pname))
                p.copy_(1 + 0.3 * torch.randn(p.shape, generator=gen, dtype=torch.float32))
        mf._randomize_mamba(model, SPEC, 0)
        mf._randomize_moe(model, SPEC, 0, 0)
        mf._randomize_expert_bias(model, SPEC, 0, 0)
    return model


def _args(save: str) -> argparse.Namespace:
    """Megatron-LM 0.19's args of this run: the unified `--hybrid-layer-pattern` (the deprecated
    `hybrid_override_pattern` unset), `num_layers` the main layers, `mtp_num_layers` the depths."""
    args = mf.make_args(SPEC, 1, save)
    vars(args).update(
        hybrid_override_pattern=None,
        hybrid_layer_pattern=PATTERN,
        mtp_hybrid_override_pattern=None,
        mtp_num_layers=1,
        mtp_loss_scaling_factor=0.1,
    )
    return args


def _job(out: str) -> None:
    import torch
    from megatron.core import dist_checkpointing
    from safetensors.torch import save_file

    with mf.cpu_rank(0, 1, _port()):
        _patch()
        mf._init_parallel(1, 1, 1)
        model = _build()
        iter_dir = Path(out) / "ckpt" / f"iter_{SPEC.iteration:07d}"
        iter_dir.mkdir(parents=True)
        common = {"args": _args(str(Path(out) / "ckpt")), "checkpoint_version": 3.0, "iteration": SPEC.iteration}
        state = {"model": model.sharded_state_dict(metadata=dict(mf.METADATA)), **common}
        dist_checkpointing.save(state, str(iter_dir), content_metadata=dict(mf.METADATA))
        (Path(out) / "ckpt" / "latest_checkpointed_iteration.txt").write_text(f"{SPEC.iteration}\n")

        loaded = _build()
        mf._load(loaded, SPEC, str(Path(out) / "ckpt"))
        loaded = loaded.float().eval()
        captured = {}
        loaded.mtp.register_forward_hook(lambda module, inputs, output: captured.update(hidden=output))
        gen = torch.Generator().manual_seed(SPEC.seed)
        ids = torch.randint(0, SPEC.vocab_size, (REFERENCE_BATCH, REFERENCE_SEQ), generator=gen)
        pos = torch.arange(REFERENCE_SEQ).unsqueeze(0).expand(REFERENCE_BATCH, -1)
        mask = torch.triu(torch.ones(REFERENCE_SEQ, REFERENCE_SEQ), diagonal=1).bool()[None, None]
        with torch.no_grad():
            logits = loaded(ids, position_ids=pos, attention_mask=mask)
            mtp_hidden = torch.chunk(captured["hidden"], 2, dim=0)[1]
            mtp_logits, _ = loaded.output_layer(mtp_hidden)
        if not torch.isfinite(logits).all() or logits.std() < 0.05:
            raise RuntimeError("degenerate reference logits")
        save_file(
            {
                "input_ids": ids.contiguous(),
                "logits": logits.float().contiguous(),
                "mtp_logits": mtp_logits.transpose(0, 1).float().contiguous(),
            },
            str(Path(out) / "megatron_logits.safetensors"),
        )
        sizes = {"pattern": PATTERN, "vocab_size": SPEC.vocab_size, "padded_vocab_size": SPEC.padded_vocab_size}
        (Path(out) / "fixture.json").write_text(json.dumps(sizes, indent=1) + "\n")


def _port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main(out: str) -> None:
    path = Path(out)
    shutil.rmtree(path / "ckpt", ignore_errors=True)
    path.mkdir(parents=True, exist_ok=True)
    _job(str(path))


if __name__ == "__main__":
    main(sys.argv[1])
