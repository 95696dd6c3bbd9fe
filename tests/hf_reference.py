"""An HF model directory made by transformers itself (config, tokenizer, generation config) for a spec,
as a user would pass it with --hf-config."""

from __future__ import annotations

from pathlib import Path

from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import AutoConfig, GenerationConfig, PreTrainedTokenizerFast

from tools.megatron_fixtures import FixtureSpec

MODEL_TYPES = {"llama": "llama", "qwen2": "qwen2", "qwen3": "qwen3"}


def write_hf_model_dir(spec: FixtureSpec, path: Path) -> Path:
    config = AutoConfig.for_model(
        MODEL_TYPES[spec.family],
        hidden_size=spec.hidden_size,
        intermediate_size=spec.ffn_hidden_size,
        num_hidden_layers=spec.num_layers,
        num_attention_heads=spec.num_attention_heads,
        num_key_value_heads=spec.num_query_groups,
        head_dim=spec.kv_channels,
        vocab_size=spec.vocab_size,
        rms_norm_eps=1e-6,
        rope_parameters={"rope_type": "default", "rope_theta": float(spec.rotary_base)},
        tie_word_embeddings=spec.tied,
        max_position_embeddings=64,
    )
    config.architectures = [f"{type(config).__name__.removesuffix('Config')}ForCausalLM"]
    config.save_pretrained(path)
    vocab = {f"tok{i}": i for i in range(spec.vocab_size)}
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="tok0"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=tokenizer, unk_token="tok0", eos_token="tok1").save_pretrained(path)
    GenerationConfig(eos_token_id=1, max_new_tokens=7).save_pretrained(path)
    return path
