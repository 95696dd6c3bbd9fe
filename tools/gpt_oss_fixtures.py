"""Tiny GPT-OSS checkpoints written by megatron-core 0.16's own GPTModel on CPU, with Megatron's reference logits.

The model is what Megatron-Bridge's GPT-OSS provider (and Megatron-LM's `--quick-geglu --glu-linear-offset 1.0
--softmax-type learnable --window-size W,0 --window-attn-skip-freq 2 --activation-func-clamp-value C`) builds:
biases on every linear, learnable attention sinks (`core_attention.softmax_offset`), sliding-window attention
on odd-numbered (1-based) layers, a softmax top-k router with a bias, experts with biases and the clamped
gated quick-GELU, and YaRN rotary embeddings (GPTModel `position_embedding_type="yarn"`).

The local spec computes all of it on CPU: its DotProductAttention takes the learnable offset and the sliding
window (no reference implementation substituted). Only the window mask helper is replaced, because it
allocates on `device="cuda"`; the replacement computes the same mask on the CPU.

Saving and the reference forward are megatron_fixtures' own jobs (`_save_job`, `_reference_job`), run in this
module's worker with this module's model builder and args in place of the generic ones. The clamp value is
small so the clamps bind on these tiny activations; the window is short so the reference sequence runs past
it.
"""

from __future__ import annotations

import argparse
import dataclasses
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

from tools import megatron_fixtures as mf
from tools.megatron_fixtures import FixtureSpec, cpu_rank, pending_builds

__all__ = ["GptOssSpec", "build_gpt_oss", "gpt_oss_model", "reshard_gpt_oss"]

_base_make_args = mf._make_args  # bound before the worker swaps the module's own for ours
ROTARY_BASE = 10000
SINK_STD = 1.0  # sinks of order 1: they take a visible share of each softmax
LOCK = ".gpt_oss.lock"


@dataclass(frozen=True)
class GptOssSpec:
    """One GPT-OSS fixture: layout, dtype, and the GPT-OSS settings a conversion must reproduce."""

    tp: int = 2
    ep: int = 2
    pp: int = 1
    dtype: str = "fp32"
    seed: int = 4321
    sliding_window: int = 4  # HF's sliding_window; Megatron's window_size is (sliding_window - 1, 0)
    clamp: float = 0.25  # activation_func_clamp_value = HF swiglu_limit
    yarn_factor: float = 4.0
    yarn_original: int = 64  # YaRN's ramp then falls between rotary frequencies, so rounding it matters
    yarn_round_to_int: bool = False  # Bridge's GPT-OSS setting (HF "truncate": false)
    resharded_from: str | None = None  # the name of the spec whose save Megatron re-saved at this layout

    @property
    def base(self) -> FixtureSpec:
        """The generic MoE spec underneath: sizes, seed and save layout (Mixtral's: every layer MoE). Experts
        are not tensor-parallel: megatron-core supports MoE biases only with expert_tensor_parallel_size 1."""
        return FixtureSpec("mixtral", tp=self.tp, pp=self.pp, ep=self.ep, etp=1, dtype=self.dtype, seed=self.seed)

    @property
    def name(self) -> str:
        tag = f"gpt_oss-tp{self.tp}ep{self.ep}pp{self.pp}-{self.dtype}-s{self.seed}-w{self.sliding_window}-c{self.clamp:g}"
        tag += f"-yarn{self.yarn_factor:g}o{self.yarn_original}{'r' if self.yarn_round_to_int else ''}"
        return tag + (f"-from-{self.resharded_from}" if self.resharded_from else "")


def build_gpt_oss(specs: list[GptOssSpec], cache_dir: Path) -> dict[GptOssSpec, Path]:
    """Each spec's save root (`cache_dir/<name>/ckpt`) with `reference.pt` beside it, built once (cached)."""
    cache_dir = Path(cache_dir).resolve()
    cache_dir.mkdir(parents=True, exist_ok=True)
    roots = {s: cache_dir / s.name / "ckpt" for s in specs}
    with pending_builds(cache_dir, specs, LOCK) as todo:
        for spec in todo:
            _run("save", spec, _save(spec, None, roots[spec]))
            _run("reference", spec, {"spec": spec.base, "root": str(roots[spec])})
    return roots


def reshard_gpt_oss(
    source: GptOssSpec, root: Path, cache_dir: Path, *, tp: int, ep: int, pp: int = 1
) -> tuple[GptOssSpec, Path]:
    """``source``'s save re-saved by Megatron's own loader at tp / ep / pp (cached), with its reference logits."""
    spec = dataclasses.replace(source, tp=tp, ep=ep, pp=pp, resharded_from=source.name)
    target = Path(cache_dir).resolve() / spec.name / "ckpt"
    with pending_builds(Path(cache_dir).resolve(), [spec], LOCK) as todo:
        for pending in todo:
            _run("save", pending, _save(pending, root, target))
            _run("reference", pending, {"spec": pending.base, "root": str(target)})
    return spec, target


def _save(spec: GptOssSpec, load: Path | None, save: Path) -> dict[str, Any]:
    base = spec.base
    return mf._job(base, load, save, base.tp, base.pp, 1, base.ep, base.etp)


def _run(task: str, spec: GptOssSpec, job: dict[str, Any]) -> None:
    world = spec.base.world_size if task == "save" else 1
    mf._spawn(world, task, [{**job, "gpt_oss": spec}], worker=_worker)


def _worker(rank: int, world: int, port: int, task: str, jobs: list[dict[str, Any]]) -> None:
    with cpu_rank(rank, world, port):
        for job in jobs:
            job = dict(job)
            gpt_oss_model(job.pop("gpt_oss"))
            {"save": mf._save_job, "reference": mf._reference_job}[task](**job)


def gpt_oss_model(spec: GptOssSpec) -> None:
    """In a spawned rank: megatron_fixtures' jobs (and those built on them) build ``spec``'s GPT-OSS model and
    args in place of the generic ones."""
    _patch_window_mask()
    mf._build_chunks = partial(_build_chunks, spec)
    mf._make_args = partial(_make_args, spec)


def _patch_window_mask() -> None:
    """megatron's sliding-window mask, allocated on the CPU (the original asks for `device="cuda"`)."""
    import torch
    from megatron.core.fusions import fused_softmax

    def mask(sq: int, skv: int, window_size: tuple[int, int]) -> torch.Tensor:
        ones = torch.ones(sq, skv, dtype=torch.bool)
        upper = torch.triu(ones, diagonal=skv - sq - window_size[0])
        return ~torch.tril(upper, diagonal=skv - sq + window_size[1])

    fused_softmax.get_sliding_window_causal_mask = mask


def _shared_fields(spec: GptOssSpec) -> dict[str, Any]:
    """GPT-OSS's settings under the same name in TransformerConfig and Megatron-LM's args."""
    return {
        "glu_linear_offset": 1.0,
        "activation_func_clamp_value": spec.clamp,
        "add_bias_linear": True,
        "softmax_type": "learnable",
        "window_size": (spec.sliding_window - 1, 0),
        "window_attn_skip_freq": 2,
        "moe_router_load_balancing_type": "none",
    }


def _config(spec: GptOssSpec, base: FixtureSpec, tp: int, pp: int, ep: int):
    """The TransformerConfig of Bridge's GPTOSSProvider at the tiny sizes (local spec, CPU-friendly)."""
    from megatron.core.fusions.fused_bias_geglu import quick_gelu
    from megatron.core.transformer import TransformerConfig

    config = mf._transformer_config(base, tp, pp, 1, ep, 1)
    fields = {f.name: getattr(config, f.name) for f in dataclasses.fields(config) if f.init}
    fields.update(activation_func=quick_gelu, **_shared_fields(spec))
    config = TransformerConfig(**fields)
    # GPTModel's YaRN reads these as attributes (Bridge's provider declares them as fields)
    for name, value in _yarn(spec).items():
        setattr(config, name, value)
    return config


def _yarn(spec: GptOssSpec) -> dict[str, Any]:
    return {
        "yarn_rotary_scaling_factor": spec.yarn_factor,
        "yarn_original_max_position_embeddings": spec.yarn_original,
        "yarn_beta_fast": 32.0,
        "yarn_beta_slow": 1.0,
        "yarn_mscale": None,
        "yarn_mscale_all_dim": None,
        "yarn_correction_range_round_to_int": spec.yarn_round_to_int,
    }


def _build_chunks(
    spec: GptOssSpec, base: FixtureSpec, tp: int, pp: int, vpp: int, ep: int = 1, etp: int | None = None, *, randomize
) -> list:
    """This rank's GPTModel (its pipeline stage), randomized like megatron_fixtures' models: values distinct per
    stage, sinks distinct per TP rank."""
    import torch
    from megatron.core import parallel_state
    from megatron.core.models.gpt import GPTModel
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_decoder_block_spec

    config = _config(spec, base, tp, pp, ep)
    pp_rank = parallel_state.get_pipeline_model_parallel_rank()
    block = get_gpt_decoder_block_spec(config, use_transformer_engine=False, normalization="RMSNorm", pp_rank=pp_rank)
    block.layer_specs = [mf._moe_layer_spec(s, base) for s in block.layer_specs]
    torch.manual_seed(mf._crc_seed(base.seed, "gpt_oss", "init", pp_rank))
    model = GPTModel(
        config=config,
        transformer_layer_spec=block,
        vocab_size=base.padded_vocab_size,
        max_sequence_length=mf.SEQ_LENGTH,
        pre_process=parallel_state.is_pipeline_first_stage(),
        post_process=parallel_state.is_pipeline_last_stage(),
        share_embeddings_and_output_weights=False,
        position_embedding_type="yarn",
        rotary_base=ROTARY_BASE,
    )
    if randomize:
        tp_rank = parallel_state.get_tensor_model_parallel_rank()
        with torch.no_grad():
            for name, p in model.named_parameters():
                sink = name.endswith("softmax_offset")
                if not (sink or name.endswith(".bias") or ("norm" in name and name.endswith("weight"))):
                    continue
                sharded = sink or getattr(p, "tensor_model_parallel", False)
                gen = torch.Generator().manual_seed(mf._crc_seed(base.seed, name, pp_rank, tp_rank if sharded else -1))
                noise = torch.randn(p.shape, generator=gen, dtype=torch.float32)
                p.copy_(SINK_STD * noise if sink else 0.2 * noise if name.endswith(".bias") else 1 + 0.3 * noise)
            mf._randomize_moe(model, base, pp_rank, 0)
    return [model.to(mf._torch_dtype(base.dtype))]


def _make_args(
    spec: GptOssSpec, base: FixtureSpec, tp: int, pp: int, vpp: int, save: str, ep: int = 1, etp: int | None = None
) -> argparse.Namespace:
    """Megatron-LM's args for the model, as its GPT-OSS flags and a YAML config for YaRN leave them."""
    args = _base_make_args(base, tp, pp, vpp, save, ep, etp)
    vars(args).update(
        swiglu=False,
        quick_geglu=True,
        **_shared_fields(spec),
        position_embedding_type="yarn",
        rotary_base=ROTARY_BASE,
        tokenizer_model="openai/gpt-oss-20b",
        **_yarn(spec),
    )
    return args
