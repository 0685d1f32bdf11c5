"""Rotary position embedding (Llama's half-rotation layout), plain or scaled.

Supported ``rope_type``: ``default``, ``linear`` and ``llama3`` (Llama 3.1's
frequency-dependent scaling). Both checkpoint styles are read: the older
``rope_theta`` + ``rope_scaling`` and the newer ``rope_parameters``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from layers.ops import NATIVE

SUPPORTED_ROPE_TYPES = ("default", "linear", "llama3")


@dataclass(frozen=True)
class RopeSpec:
    theta: float = 10000.0
    rope_type: str = "default"
    factor: float = 1.0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position_embeddings: int = 8192

    @classmethod
    def from_hf_config(cls, hf: dict) -> "RopeSpec":
        params = dict(hf.get("rope_parameters") or {})
        params.update(hf.get("rope_scaling") or {})
        theta = params.get("rope_theta", hf.get("rope_theta", 10000.0))
        rope_type = params.get("rope_type", params.get("type", "default"))
        if rope_type not in SUPPORTED_ROPE_TYPES:
            raise ValueError(f"rope type {rope_type!r} is not supported; supported: "
                             f"{', '.join(SUPPORTED_ROPE_TYPES)}")
        return cls(
            theta=float(theta), rope_type=rope_type, factor=float(params.get("factor", 1.0)),
            low_freq_factor=float(params.get("low_freq_factor", 1.0)),
            high_freq_factor=float(params.get("high_freq_factor", 4.0)),
            original_max_position_embeddings=int(params.get(
                "original_max_position_embeddings", hf.get("max_position_embeddings", 8192))))


def inverse_frequencies(spec: RopeSpec, head_dim: int) -> torch.Tensor:
    # (head_dim // 2,)
    inv = 1.0 / (spec.theta ** (torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim))
    if spec.rope_type == "linear":
        return inv / spec.factor
    if spec.rope_type == "llama3":
        return _llama3_scale(inv, spec)
    return inv


def _llama3_scale(inv: torch.Tensor, spec: RopeSpec) -> torch.Tensor:
    """Long wavelengths are divided by ``factor``, short ones kept, the band between blended."""
    old_len = spec.original_max_position_embeddings
    long_wavelen = old_len / spec.low_freq_factor
    short_wavelen = old_len / spec.high_freq_factor
    wavelen = 2 * math.pi / inv
    scaled = torch.where(wavelen > long_wavelen, inv / spec.factor, inv)
    smooth = (old_len / wavelen - spec.low_freq_factor) / (spec.high_freq_factor - spec.low_freq_factor)
    blended = (1 - smooth) * scaled / spec.factor + smooth * scaled
    in_band = (wavelen >= short_wavelen) & (wavelen <= long_wavelen)
    return torch.where(in_band, blended, scaled)


class RotaryEmbedding(nn.Module):
    """One instance serves every layer of a model: the angles of a step's positions are
    computed by the first layer and reused by the others (the same ``positions`` tensor)."""

    ops = NATIVE  # the worker's platform (layers.platform.use_ops)

    def __init__(self, head_dim: int, spec: RopeSpec):
        super().__init__()
        self.register_buffer("inv_freq", inverse_frequencies(spec, head_dim), persistent=False)
        self._positions: torch.Tensor | None = None  # what the cached tables are for
        self._tables: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}

    def cos_sin(self, positions: torch.Tensor, full: bool) -> tuple[torch.Tensor, torch.Tensor]:
        """cos and sin of the step's angles: (tokens, head_dim // 2), or with ``full``
        (tokens, 1, head_dim) (both halves, broadcast over heads)."""
        if positions is not self._positions:
            freqs = positions.float().unsqueeze(-1) * self.inv_freq  # (tokens, head_dim // 2)
            self._positions, self._tables = positions, {"half": (freqs.cos(), freqs.sin())}
        if full and "full" not in self._tables:
            self._tables["full"] = tuple(torch.cat((t, t), dim=-1).unsqueeze(1)
                                         for t in self._tables["half"])
        return self._tables["full" if full else "half"]

    def rotate_(self, positions: torch.Tensor, heads: torch.Tensor) -> None:
        """Rotate in place: heads (tokens, n, head_dim), e.g. the q and k heads of a fused
        qkv output, by the platform's op."""
        self.ops.rotate_(heads, self, positions)

