"""Tiny random `transformers` models (torch, CPU, float32): the independent reference for the policy."""

import torch
import transformers

ARCH_CONFIGS = {
  # GQA (4 query heads, 2 KV heads), untied, RoPE theta from config.
  "llama": lambda: transformers.LlamaConfig(
    vocab_size=97,
    hidden_size=64,
    intermediate_size=96,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    rope_theta=500.0,
    rms_norm_eps=1e-5,
    tie_word_embeddings=False,
  ),
  # q/k/v bias, tied embeddings.
  "qwen2": lambda: transformers.Qwen2Config(
    vocab_size=97,
    hidden_size=64,
    intermediate_size=96,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    rope_theta=10000.0,
    tie_word_embeddings=True,
  ),
  # q/k RMSNorm per head, head_dim != hidden / heads.
  "qwen3": lambda: transformers.Qwen3Config(
    vocab_size=97,
    hidden_size=64,
    intermediate_size=96,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=24,
    rope_theta=1000000.0,
    tie_word_embeddings=False,
  ),
}


def random_hf_model(arch: str, seed: int = 0):
  """A transformers model with non-trivial weights everywhere (biases and norm scales too)."""
  torch.manual_seed(seed)
  cfg = ARCH_CONFIGS[arch]()
  cfg.eos_token_id = None
  cfg.bos_token_id = None
  cfg.pad_token_id = None
  model = transformers.AutoModelForCausalLM.from_config(cfg, dtype=torch.float32).eval()
  with torch.no_grad():
    for name, p in model.named_parameters():
      if name.endswith("bias") or "norm" in name:
        p.add_(0.1 * torch.randn_like(p))
  return model


def hf_logits(model, tokens, attention_mask=None):
  with torch.no_grad():
    t = torch.tensor(tokens, dtype=torch.long)
    m = None if attention_mask is None else torch.tensor(attention_mask, dtype=torch.long)
    return model(input_ids=t, attention_mask=m).logits.float().numpy()
