"""K/V storage of a model, addressed by block id, one tensor pair per layer."""

from __future__ import annotations

import torch

from accordion.models.config import ModelConfig


class KVCache:
    def __init__(
        self, cfg: ModelConfig, num_blocks: int, block_size: int, dtype: torch.dtype
    ) -> None:
        shape = (cfg.n_layers, num_blocks, block_size, cfg.n_kv_heads, cfg.head_dim)
        self.k = torch.zeros(shape, dtype=dtype)
        self.v = torch.zeros(shape, dtype=dtype)
        self.block_size = block_size
        self.num_blocks = num_blocks

    def layer(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.k[i], self.v[i]

    def group_of(self, i: int) -> int:
        return 0

    @property
    def bytes_per_block(self) -> int:
        per_layer = self.k[0, 0].numel() * self.k.element_size()
        return 2 * per_layer * self.k.shape[0]
