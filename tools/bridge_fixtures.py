"""Peer vectors written by the real Megatron-Bridge 0.6.2 package (tests/data/bridge/), on CPU.

Usage: ``/work/venv312/bin/python tools/bridge_fixtures.py OUT_DIR [CASE ...]`` (default: every case).

Our other fixtures imitate Megatron-Bridge's layout with megatron-core; these are what Bridge itself
writes and exports, so the converter can be judged against its peer. For each case it builds a tiny
model from a local transformers config (no hub access) through ``AutoBridge.from_hf_config`` and the
provider Bridge derives from it, on spawned gloo ranks (one process per rank), and saves:

- the base with ``AutoBridge.save_megatron_model``;
- for PEFT cases, the adapter with Bridge's training ``save_checkpoint`` and ``cfg.peft`` set (no
  optimizer or RNG state: ``save_optim=False``, ``save_rng=False``; ``train_state.step`` = 20); its
  ``run_config.yaml``'s ``checkpoint.pretrained_checkpoint`` is the base's path relative to OUT_DIR
  (``<model>/base``);
- Bridge's own exports of the live model: ``save_hf_pretrained`` (base, and merged base + adapter),
  ``save_hf_adapter``; and for MoE ``export_adapter_ckpt`` from the saved PEFT checkpoint (1 rank);
- Megatron's own fp32 forward of the live model (base, and base with adapters), logits gathered over
  TP, with the fixed input ids: ``logits.safetensors`` {``input_ids``, ``logits``};
- for PEFT cases, the forward of Bridge's own one-rank reload of the saved checkpoint (base from its HF
  export, adapters loaded as ``export_adapter_ckpt`` loads them): ``tp1_reload_logits.safetensors``.

Adapters are not left at Bridge's init (B = 0): A, B and DoRA magnitudes are refilled with seeded
values (0.1·N(0, 1)), the same on every rank where a tensor is replicated and per rank where it is
sharded (TP, expert TP, and per EP rank for expert adapters); DoRA magnitudes are
``||W + s·BA||_row · (1 + 0.2·|n|)`` over full rows. Router weights are 0.5·N(0, 1), so top-k picks differ
between tokens.

Environment (Megatron-Bridge 0.6.2 needs Python >= 3.12):

- ``~/.pyenv/versions/3.12.1/bin/python -m venv /work/venv312``; ``pip install torch==2.13.0`` (only a
  cp311 CPU wheel is local, so pip takes the CUDA build; it runs on CPU);
- ``pip install --no-deps megatron-bridge==0.6.2 megatron-core==0.19.2`` (Bridge's full dependency set
  fails to install here: ``fast-hadamard-transform`` builds against torch at install time, and it
  pins flashinfer, wandb, ...); then by hand ``numpy packaging transformers==5.12.1 peft safetensors
  omegaconf hydra-core pyyaml regex einops rich six tqdm accelerate sentencepiece nvidia-modelopt requests
  datasets megatron-energon tensorboard``
  (imported by Bridge's training checkpointing and config modules).

CPU stubs and patches: tools/bridge_cpu.py. Models and adapters: tools/bridge_models.py.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tools.bridge_cpu import cpu_rank, for_cpu, padded
from tools.bridge_models import CASES, STEP, Case, build, hf_config, peft_for, randomize_adapters, save_logits
from tools.megatron_fixtures import _spawn


def _worker(rank: int, world: int, port: int, task: str, jobs: list[dict[str, Any]]) -> None:
    with cpu_rank(rank, world, port):
        for job in jobs:
            {"case": _case_job, "export_adapter": _export_adapter_job, "reload": _reload_job}[task](**job)


def _case_job(case: Case, out: str) -> None:
    os.chdir(out)  # every path Bridge records (run_config.yaml, .metadata) is relative to OUT_DIR
    root = Path(case.model_dir)
    bridge, provider, model = build(case)
    if case.peft is None:
        _save_base(bridge, model, root)
    else:
        _save_peft(bridge, provider, model, case, root / case.peft)


def _save_base(bridge: Any, model: list, root: Path) -> None:
    import torch

    bridge.save_megatron_model(model, str(root / "base"))
    bridge.save_hf_pretrained(model, str(root / "base_hf"), show_progress=False)
    save_logits(model, root / "base_logits.safetensors")
    if torch.distributed.get_rank() == 0:
        hf_config_dir = root / "hf_config"
        hf_config_dir.mkdir(parents=True, exist_ok=True)
        hf_config(root.name.split("_")[0]).to_json_file(str(hf_config_dir / "config.json"))


def _save_peft(bridge: Any, provider: Any, model: list, case: Case, out: Path) -> None:
    from megatron.bridge.training.checkpointing import save_checkpoint
    from megatron.bridge.training.config import CheckpointConfig, ConfigContainer, LoggerConfig
    from megatron.bridge.training.state import GlobalState
    from megatron.core.optimizer import OptimizerConfig

    peft = peft_for(case.peft, case)
    model = peft(model, training=True)
    randomize_adapters(model)
    state = GlobalState()
    state.cfg = ConfigContainer(
        model=provider,
        train=None,
        optimizer=OptimizerConfig(use_distributed_optimizer=False),
        ddp=None,
        scheduler=None,
        dataset=None,
        logger=LoggerConfig(),
        tokenizer=None,
        checkpoint=CheckpointConfig(
            async_save=False,
            save=str(out / "ckpt"),
            save_optim=False,
            save_rng=False,
            ckpt_format="torch_dist",
            pretrained_checkpoint=f"{case.model_dir}/base",
        ),
        dist=None,
        peft=peft,
    )
    state.train_state.step = STEP
    save_checkpoint(state, model, None, None, 0)
    save_logits(model, out / "logits.safetensors")
    bridge.save_hf_pretrained(model, str(out / "merged_hf"), show_progress=False)
    bridge.save_hf_adapter(model, str(out / "hf_adapter"), peft_config=peft, show_progress=False)


def _export_adapter_job(case: Case, out: str) -> None:
    """Bridge's ``export_adapter_ckpt`` of the saved PEFT checkpoint, from its own HF export of the base."""
    from megatron.bridge import AutoBridge

    os.chdir(out)
    root = Path(case.model_dir)
    bridge = AutoBridge.from_hf_pretrained(str(root / "base_hf"))
    to_provider = bridge.to_megatron_provider
    bridge.to_megatron_provider = lambda *a, **k: padded(for_cpu(to_provider(*a, **k)))
    iter_dir = root / case.peft / "ckpt" / f"iter_{STEP:07d}"  # the save root is refused (no .metadata there)
    bridge.export_adapter_ckpt(str(iter_dir), str(root / case.peft / "export_adapter_ckpt"))


def _reload_job(case: Case, out: str) -> None:
    """Bridge's own TP1 reload of the PEFT checkpoint (base from its HF export, adapters loaded the way
    ``export_adapter_ckpt`` loads them), and its forward: what the checkpoint holds, on one rank."""
    from megatron.bridge import AutoBridge
    from megatron.bridge.training.checkpointing import (
        _generate_model_state_dict,
        apply_peft_adapter_filter_to_state_dict,
    )
    from megatron.core import dist_checkpointing

    os.chdir(out)
    root = Path(case.model_dir)
    peft = peft_for(case.peft, case)
    provider = AutoBridge.from_hf_pretrained(str(root / "base_hf")).to_megatron_provider(load_weights=True)
    padded(for_cpu(provider))
    provider.finalize()
    provider.register_pre_wrap_hook(lambda chunks: peft(chunks, training=False))
    model = provider.provide_distributed_model(
        wrap_with_ddp=False,
        use_cpu_initialization=True,
        init_model_with_meta_device=False,
        mixed_precision_wrapper=None,
    )
    state = apply_peft_adapter_filter_to_state_dict(_generate_model_state_dict(model, {}), peft)
    loaded = dist_checkpointing.load(state, str(root / case.peft / "ckpt" / f"iter_{STEP:07d}"))
    model[0].load_state_dict(loaded["model"], strict=False)
    save_logits(model, root / case.peft / "tp1_reload_logits.safetensors")


def main(argv: list[str]) -> None:
    import logging

    logging.basicConfig(level=logging.INFO)
    out = Path(argv[0]).resolve()
    names = argv[1:] or list(CASES)
    out.mkdir(parents=True, exist_ok=True)
    for name in names:
        case = CASES[name]
        _spawn(case.world, "case", [{"case": case, "out": str(out)}], timeout=900, worker=_worker)
        if case.model == "moe" and case.peft:
            _spawn(1, "export_adapter", [{"case": case, "out": str(out)}], timeout=900, worker=_worker)
        if case.peft:
            _spawn(1, "reload", [{"case": case, "out": str(out)}], timeout=900, worker=_worker)
    (out / "MANIFEST.json").write_text(json.dumps({n: str(CASES[n]) for n in names}, indent=1) + "\n")


if __name__ == "__main__":
    main(sys.argv[1:])
