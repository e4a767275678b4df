"""Tiny random models built from configs (no Hub access), shared by the test-suite."""

from __future__ import annotations

import pytest
import torch
import transformers

import nsn_peft  # noqa: F401  (registers the method with PEFT)


def tiny_llama(seed: int = 0, hidden: int = 32, layers: int = 2) -> transformers.PreTrainedModel:
    torch.manual_seed(seed)
    config = transformers.LlamaConfig(
        hidden_size=hidden, intermediate_size=48, num_hidden_layers=layers, num_attention_heads=4,
        num_key_value_heads=2, vocab_size=101, max_position_embeddings=64,
    )
    return transformers.LlamaForCausalLM(config).eval()


def tiny_gpt2(seed: int = 0) -> transformers.PreTrainedModel:
    torch.manual_seed(seed)
    config = transformers.GPT2Config(n_embd=32, n_layer=2, n_head=4, vocab_size=101, n_positions=64)
    return transformers.GPT2LMHeadModel(config).eval()


def tiny_neox(seed: int = 0) -> transformers.PreTrainedModel:
    torch.manual_seed(seed)
    config = transformers.GPTNeoXConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, vocab_size=101,
        max_position_embeddings=64,
    )
    return transformers.GPTNeoXForCausalLM(config).eval()


def tiny_opt(seed: int = 0) -> transformers.PreTrainedModel:
    torch.manual_seed(seed)
    config = transformers.OPTConfig(
        hidden_size=32, ffn_dim=64, num_hidden_layers=2, num_attention_heads=4, vocab_size=101,
        max_position_embeddings=64, word_embed_proj_dim=32,
    )
    return transformers.OPTForCausalLM(config).eval()


def tiny_bert_classifier(seed: int = 0) -> transformers.PreTrainedModel:
    torch.manual_seed(seed)
    config = transformers.BertConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, vocab_size=101,
        max_position_embeddings=64, num_labels=3,
    )
    return transformers.BertForSequenceClassification(config).eval()


CAUSAL_FACTORIES = {"llama": tiny_llama, "gpt2": tiny_gpt2, "neox": tiny_neox, "opt": tiny_opt}


@pytest.fixture
def input_ids() -> torch.Tensor:
    return torch.randint(0, 101, (2, 12), generator=torch.Generator().manual_seed(1))
