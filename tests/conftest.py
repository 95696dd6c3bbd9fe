"""Session fixtures: real megatron-core checkpoints (written once per session) and helpers to judge them."""

from __future__ import annotations

import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tools.lora_fixtures import AdapterSpec, build_adapters  # noqa: E402
from tools.megatron_fixtures import FixtureSpec, build_fixtures, pending_builds, reshard  # noqa: E402

LAYOUTS = [(1, 1, 1), (2, 2, 1), (1, 2, 2)]
FAMILIES = ["llama", "qwen2", "qwen3"]

PARITY_SPECS = [
    *(FixtureSpec(family, tp=tp, pp=pp, vpp=vpp) for family in FAMILIES for tp, pp, vpp in LAYOUTS),
    FixtureSpec("qwen3", tp=2, pp=2, tied=True),
    FixtureSpec("qwen3", tp=2, pp=2, per_layer_keys=True),
    FixtureSpec("qwen2", tp=2, pp=2, common_in_dcp=True),
    FixtureSpec("llama", tp=2, pp=1, vocab_size=250),
    *(FixtureSpec(family, tp=2, pp=2, dtype="bf16") for family in FAMILIES),
]
BASE_SPEC = FixtureSpec("llama")  # also resharded to TP2 PP2 (base_tp2pp2)

LEGACY_SPECS = [  # each also saved with --ckpt-format torch (tools.megatron_fixtures.legacy_root)
    FixtureSpec("qwen3", tp=2, pp=2, vpp=2, vocab_size=250, legacy_twin=True),
    FixtureSpec("llama", pp=2, first_stage_layers=1, legacy_twin=True),  # uneven pipeline split
    FixtureSpec("qwen3_moe", tp=2, ep=2, legacy_twin=True),  # expert TP = 2
]
DCP_SPEC = FixtureSpec("qwen2", dcp_twin=True)  # also saved as plain PyTorch DCP (torch_dcp)

LORA_SPECS = [
    AdapterSpec(FixtureSpec("qwen3", tp=2, pp=2)),  # all four targets, adapter-only save at TP2
    AdapterSpec(FixtureSpec("qwen3", tp=2, pp=2), combined=True),  # base and adapter keys in one save
]
DORA_SPEC = AdapterSpec(FixtureSpec("qwen3", tp=2, pp=2), kind="dora", alpha=64)  # magnitudes, fc1 rank-major
CANONICAL_SPECS = [  # CanonicalLoRA at TP2: q/k/v pieces, gate/up B rows in the swiglu factory's order
    AdapterSpec(FixtureSpec("qwen3", tp=2, pp=2), kind="canonical_lora"),
    AdapterSpec(
        FixtureSpec("qwen3", tp=2, pp=2), kind="canonical_lora", targets=("linear_q", "linear_v", "linear_fc1_up")
    ),
]
MOE_BASE = FixtureSpec("qwen3_moe", tp=2, ep=2)
MOE_LORA_SPECS = [  # expert adapters (fc1 / fc2) plus attention targets, written at TP2 EP2
    AdapterSpec(MOE_BASE),  # shared: one adapter per EP rank in every local expert slot
    AdapterSpec(MOE_BASE, expert_layout="per_expert"),
    AdapterSpec(MOE_BASE, expert_layout="legacy_2d"),  # one 2-D adapter for all experts
    AdapterSpec(MOE_BASE, dim=6, alpha=12, normalize_moe_lora=True),  # expert rank dim // topk
]
MISFIT_BASE = FixtureSpec("qwen3", ffn_hidden_size=128)  # a base the LoRA adapter does not fit
# experts_shared_outer_loras (fc1 A and fc2 B shared by all experts) plus a router adapter, at TP2 EP2 expert TP1;
# rank 4 = num_experts, so a shared A [L, r, h] also looks like [L, E, h]
SHARED_OUTER_SPEC = AdapterSpec(
    MOE_BASE, dim=4, alpha=8, targets=("linear_fc1", "linear_fc2", "router"), etp=1, expert_layout="shared_outer"
)
DEEPSEEK_BASE = FixtureSpec("deepseek_v3", tp=2, ep=2)  # also in MOE_SPECS
MLA_LORA_SPECS = [  # MLA projections, router, linear_fc1/fc2 on dense, shared and routed experts (MTP layer too)
    AdapterSpec(DEEPSEEK_BASE),
    AdapterSpec(FixtureSpec("deepseek_v3", tp=2, ep=2, q_lora_rank=None)),  # linear_q_proj
]

MOE_SPECS = [
    FixtureSpec("qwen3_moe", tp=2, ep=2, dtype="bf16"),  # expert TP = TP = 2
    FixtureSpec("qwen3_moe", tp=2, ep=2),  # also resharded to EP1 for the invariance test
    FixtureSpec("qwen3_moe", tp=2, ep=2, etp=1),
    FixtureSpec("qwen3_moe", pp=2, vpp=2, ep=2, moe_layer_freq=(1, 0, 1, 1)),  # a dense layer: per-layer keys
    FixtureSpec("mixtral", pp=2, ep=2),
    FixtureSpec("deepseek_v3", tp=2, ep=2),  # q LoRA, shared experts, sigmoid + bias, dense layer 0, MTP
    FixtureSpec("deepseek_v3", tp=2, ep=2, q_lora_rank=None),
    # other key spellings of the same layouts
    FixtureSpec("qwen3_moe", tp=2, ep=2, singleton_local_shards=True),  # experts.experts.{e}, fc1 _w / _v
    FixtureSpec("qwen3_moe", tp=2, ep=2, local_norm_keys=True),
    FixtureSpec("deepseek_v3", tp=2, ep=2, local_norm_keys=True),  # q_layernorm / kv_layernorm
]


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """The slow tier is every test that needs a checkpoint written by megatron-core (all such fixtures
    hang off ``megatron_cache``), plus the byte fuzzers marked by hand; the rest is the fast tier,
    ``pytest -m "not slow"``."""
    for item in items:
        if "megatron_cache" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.slow)


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption(
        "--megatron-cache",
        default=None,
        help="directory to keep megatron-core fixtures between runs, given as --megatron-cache=DIR "
        "(default: a fresh session tmp dir)",
    )


@pytest.fixture(scope="session")
def megatron_cache(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Path:
    chosen = request.config.getoption("--megatron-cache")
    return Path(chosen) if chosen else tmp_path_factory.mktemp("megatron")


@pytest.fixture(scope="session")
def checkpoints(megatron_cache: Path) -> dict[FixtureSpec, Path]:
    """Every spec's save root, written by megatron-core in one batch (process start-up dominates)."""
    return build_fixtures([*PARITY_SPECS, BASE_SPEC, *MOE_SPECS, *LEGACY_SPECS, DCP_SPEC, MISFIT_BASE], megatron_cache)


@pytest.fixture(scope="session")
def adapters(megatron_cache: Path, checkpoints: dict[FixtureSpec, Path]) -> dict[AdapterSpec, Path]:
    """Every adapter spec's save root, written in one batch (one spawn per layout, one reference pass)."""
    specs = [*LORA_SPECS, *MOE_LORA_SPECS, SHARED_OUTER_SPEC, *MLA_LORA_SPECS, *CANONICAL_SPECS, DORA_SPEC]
    return build_adapters(specs, megatron_cache)


@pytest.fixture(scope="session")
def base_tp2pp2(checkpoints: dict[FixtureSpec, Path], megatron_cache: Path) -> Path:
    """BASE_SPEC's save re-saved at TP2 PP2 by Megatron's own loader, cached beside the fixtures."""
    resharded = SimpleNamespace(name=f"{BASE_SPEC.name}-reshard-tp2pp2")
    with pending_builds(megatron_cache, [resharded], ".reshard.lock", lambda _: {}) as todo:
        if todo:
            reshard(checkpoints[BASE_SPEC], BASE_SPEC, megatron_cache / resharded.name / "ckpt", tp=2, pp=2)
    return megatron_cache / resharded.name / "ckpt"


@pytest.fixture(scope="session")
def plain(tmp_path_factory: pytest.TempPathFactory) -> dict[str, bytes]:
    """The bundled example converted once, plainly, at `split_runs.SHARD`: what every split run must equal."""
    from split_runs import EXAMPLE, SHARD, tree

    from offline_bridge import convert

    return tree(convert(EXAMPLE, tmp_path_factory.mktemp("plain") / "out", max_shard_size=SHARD, progress=False))
