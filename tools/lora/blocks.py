"""Qwen2 decoder blocks in PyTorch, on weights dequantised from the GGUF llama.cpp runs, with LoRA.

Shared by the LoRA tools (tools/sentiment_lora, tools/chat_lora). Only the blocks being tuned are
rebuilt: the ones below are frozen, so their output for every token (captured from llama.cpp
once) is all training needs. Checked against llama.cpp: blocks 10-12 recomputed from block 9's
output match llama.cpp's block-12 output to cosine 0.99998.
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from gguf import GGUFReader
from gguf.quants import dequantize

# Qwen2.5-0.5B: 14 query heads, 2 key/value heads of 64, RMSNorm eps 1e-6, RoPE base 1e6 (NeoX layout).
N_HEAD, N_HEAD_KV, HEAD_DIM, EPS, ROPE_BASE = 14, 2, 64, 1e-6, 1e6
# llama.cpp's tensor names for the projections a LoRA adapts (adapter GGUF: <name>.weight.lora_a/b).
PROJECTIONS = {
    "q": "attn_q",
    "k": "attn_k",
    "v": "attn_v",
    "o": "attn_output",
    "gate": "ffn_gate",
    "up": "ffn_up",
    "down": "ffn_down",
}


def load_blocks(gguf_path: str, indices: list[int], extra: tuple[str, ...] = ()) -> dict[str, torch.Tensor]:
    """The tuned blocks' weights, dequantised to float32, plus any tensors named in `extra`."""
    wanted = tuple(f"blk.{i}." for i in indices)
    weights = {}
    for tensor in GGUFReader(gguf_path).tensors:
        if tensor.name.startswith(wanted) or tensor.name in extra:
            values = np.asarray(dequantize(tensor.data, tensor.tensor_type), dtype=np.float32)
            weights[tensor.name] = torch.tensor(values.reshape([int(n) for n in reversed(tensor.shape)]))
    return weights


class LoRALinear(nn.Module):
    """y = W x + b + (alpha / rank) B A x, as llama.cpp applies an adapter at scale 1."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, rank: int, alpha: float):
        super().__init__()
        self.register_buffer("weight", weight)
        self.register_buffer("bias", bias)
        self.A = nn.Parameter(torch.randn(rank, weight.shape[1]) / math.sqrt(weight.shape[1]))
        self.B = nn.Parameter(torch.zeros(weight.shape[0], rank))  # starts as the model itself
        self.scale = alpha / rank

    def forward(self, x):
        return F.linear(x, self.weight, self.bias) + (x @ self.A.t()) @ self.B.t() * self.scale


def rms_norm(x, weight=None):
    x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + EPS)
    return x if weight is None else x * weight


def rope(x, positions):
    half = HEAD_DIM // 2
    angles = positions[..., None].float() * ROPE_BASE ** (-torch.arange(half, dtype=torch.float32) * 2 / HEAD_DIM)
    cos, sin = angles.cos()[:, :, None, :], angles.sin()[:, :, None, :]
    x1, x2 = x[..., :half], x[..., half:]
    return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], -1)


class FrozenLinear(nn.Module):
    """A projection the adapter leaves alone (see `targets` in Block)."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None):
        super().__init__()
        self.register_buffer("weight", weight)
        self.register_buffer("bias", bias)

    def forward(self, x):
        return F.linear(x, self.weight, self.bias)


class Block(nn.Module):
    def __init__(self, weights: dict, index: int, rank: int, alpha: float, targets=tuple(PROJECTIONS)):
        super().__init__()

        def w(name):
            return weights.get(f"blk.{index}.{name}")

        self.register_buffer("attn_norm", w("attn_norm.weight"))
        self.register_buffer("ffn_norm", w("ffn_norm.weight"))
        self.proj = nn.ModuleDict(
            {
                short: LoRALinear(w(f"{name}.weight"), w(f"{name}.bias"), rank, alpha)
                if short in targets
                else FrozenLinear(w(f"{name}.weight"), w(f"{name}.bias"))
                for short, name in PROJECTIONS.items()
            }
        )

    def keys_values(self, x, positions):
        h = rms_norm(x, self.attn_norm)
        b, t, _ = x.shape
        return (
            rope(self.proj["k"](h).view(b, t, N_HEAD_KV, HEAD_DIM), positions),
            self.proj["v"](h).view(b, t, N_HEAD_KV, HEAD_DIM),
        )

    def forward(self, x, positions, allowed, prefix_kv=None, only=None):
        """x (B, T, d); `allowed` (B, T, P+T) attention mask over prefix and own tokens;
        `only`: per row, the one position whose output is needed (the last block)."""
        k, v = self.keys_values(x, positions)
        b = x.shape[0]
        if only is not None:  # in the last block only the reading position's query matters
            rows = torch.arange(b)
            x, positions, allowed = x[rows, only][:, None], positions[rows, only][:, None], allowed[rows, only][:, None]
        h = rms_norm(x, self.attn_norm)
        q = rope(self.proj["q"](h).view(b, x.shape[1], N_HEAD, HEAD_DIM), positions)
        if prefix_kv is not None:
            k = torch.cat([prefix_kv[0].expand(b, -1, -1, -1), k], 1)
            v = torch.cat([prefix_kv[1].expand(b, -1, -1, -1), v], 1)
        # (B, heads, T, 64); the 2 key/value heads serve 7 query heads each (enable_gqa).
        out = F.scaled_dot_product_attention(
            q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_mask=allowed[:, None], enable_gqa=True
        )
        x = x + self.proj["o"](out.transpose(1, 2).reshape(b, x.shape[1], -1))
        h = rms_norm(x, self.ffn_norm)
        return x + self.proj["down"](F.silu(self.proj["gate"](h)) * self.proj["up"](h))


def prefix_and_batch_masks(prefix, x):
    """Positions and attention masks for a shared prefix (P, d) followed by a batch x (B, T, d):
    every text sees the whole prefix and itself causally; the prefix sees itself causally. Padding
    sits after every real token, so the causal mask alone keeps it out of them."""
    b, t, _ = x.shape
    p = prefix.shape[0]
    prefix_positions = torch.arange(p)[None]
    positions = (p + torch.arange(t))[None].expand(b, -1)
    allowed = torch.cat(
        [
            torch.ones(b, t, p, dtype=torch.bool),
            torch.tril(torch.ones(t, t, dtype=torch.bool))[None].expand(b, -1, -1),
        ],
        2,
    )
    prefix_allowed = torch.tril(torch.ones(p, p, dtype=torch.bool))[None]
    return prefix_positions, positions, allowed, prefix_allowed


class TunedBlocks(nn.Module):
    """Blocks first..last-1 over a shared prompt prefix and a batch of texts after it; returns the
    residual stream at each text's last token after the last block."""

    def __init__(self, weights: dict, indices: list[int], rank: int = 8, alpha: float = 16.0):
        super().__init__()
        self.indices, self.alpha = indices, alpha
        self.blocks = nn.ModuleList([Block(weights, i, rank, alpha) for i in indices])

    def forward(self, prefix, x, lengths):
        """prefix (P, d): the prefix's states entering the first tuned block; x (B, T, d): the texts'
        (padded); lengths (B,)."""
        prefix_positions, positions, allowed, prefix_allowed = prefix_and_batch_masks(prefix, x)
        states = prefix[None]
        for n, block in enumerate(self.blocks):
            # The adapter changes the prefix's keys and values too (llama.cpp applies it to every
            # token of the lane), so the prefix goes through the tuned blocks with the texts.
            prefix_kv = block.keys_values(states, prefix_positions)
            last = n == len(self.blocks) - 1
            if not last:
                states = block(states, prefix_positions, prefix_allowed)
            x = block(x, positions, allowed, prefix_kv, only=lengths - 1 if last else None)
        return x[:, 0]

    def lora_tensors(self) -> dict[str, np.ndarray]:
        return lora_tensors(self.indices, self.blocks)


def lora_tensors(indices, blocks) -> dict[str, np.ndarray]:
    """The adapter's tensors under llama.cpp's names: lora_a (rank, in), lora_b (out, rank)."""
    out = {}
    for index, block in zip(indices, blocks, strict=True):
        for short, name in PROJECTIONS.items():
            layer = block.proj[short]
            if isinstance(layer, LoRALinear):
                out[f"blk.{index}.{name}.weight.lora_a"] = layer.A.detach().numpy().astype(np.float32)
                out[f"blk.{index}.{name}.weight.lora_b"] = layer.B.detach().numpy().astype(np.float32)
    return out


def write_adapter(path, tensors: dict[str, np.ndarray], alpha: float, dtype=np.float32) -> None:
    """A llama.cpp LoRA adapter GGUF: general.type "adapter", adapter.lora.alpha, the tensors."""
    from gguf import GGUFWriter

    writer = GGUFWriter(str(path), arch="qwen2")
    writer.add_type("adapter")
    writer.add_string("adapter.type", "lora")
    writer.add_float32("adapter.lora.alpha", alpha)
    for name, tensor in tensors.items():
        writer.add_tensor(name, tensor.astype(dtype))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


class CausalBlocks(nn.Module):
    """The top blocks of the model with LoRA, then the final norm and the (frozen) output
    projection: next-token logits for chosen positions of a batch of sequences that all follow one
    shared prefix. Used to teach the chat role its replies (tools/chat_lora).

    The prefix's states go through the tuned blocks once per batch, with gradients: llama.cpp
    applies the adapter to every token of the lane, the system prompt included."""

    def __init__(
        self, weights: dict, indices: list[int], rank: int = 8, alpha: float = 16.0, targets=tuple(PROJECTIONS)
    ):
        super().__init__()
        self.indices, self.alpha = indices, alpha
        self.blocks = nn.ModuleList([Block(weights, i, rank, alpha, targets) for i in indices])
        self.register_buffer("output_norm", weights["output_norm.weight"])
        # Qwen2.5-0.5B ties the output projection to the token embeddings.
        self.register_buffer("output", weights.get("output.weight", weights.get("token_embd.weight")))

    def hidden(self, prefix, x, lengths):
        """prefix (P, d) and x (B, T, d): states entering the first tuned block (x padded at the
        end; `lengths` (B,) real lengths). Returns the final-normed states (B, T, d)."""
        prefix_positions, positions, allowed, prefix_allowed = prefix_and_batch_masks(prefix, x)
        states = prefix[None]
        for n, block in enumerate(self.blocks):
            prefix_kv = block.keys_values(states, prefix_positions)
            if n < len(self.blocks) - 1:
                states = block(states, prefix_positions, prefix_allowed)
            x = block(x, positions, allowed, prefix_kv)
        return rms_norm(x, self.output_norm)

    def loss(self, prefix, x, lengths, positions, targets, reduction: str = "mean"):
        """Cross-entropy of `targets` (N,) predicted at (row, position) pairs `positions` (N, 2):
        the mean, or with reduction="none" one value per target."""
        h = self.hidden(prefix, x, lengths)[positions[:, 0], positions[:, 1]]
        return F.cross_entropy(h @ self.output.t(), targets, reduction=reduction)

    def lora_tensors(self) -> dict[str, np.ndarray]:
        return lora_tensors(self.indices, self.blocks)
