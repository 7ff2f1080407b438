"""The order in which training reads its examples: epochs of random permutations, exactly resumable."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from ddpm.data.errors import DataError

__all__ = ["DataOrder"]


class DataOrder:
    """Epochs of random permutations of N examples, read off in order: exactly resumable.

    The state is the current permutation, the cursor into it and the generator that draws the next.
    """

    def __init__(self, num_examples: int, seed: int):
        self.num_examples = num_examples
        self.generator = torch.Generator().manual_seed(seed)
        self.perm = torch.randperm(num_examples, generator=self.generator)
        self.cursor = 0
        self.epoch = 0

    def next(self, count: int) -> Tensor:
        """The next ``count`` example indices (crossing into new epochs as needed)."""
        parts, needed = [], count
        while needed:
            if self.cursor == self.num_examples:
                self.perm = torch.randperm(self.num_examples, generator=self.generator)
                self.cursor, self.epoch = 0, self.epoch + 1
            take = min(needed, self.num_examples - self.cursor)
            parts.append(self.perm[self.cursor:self.cursor + take])
            self.cursor += take
            needed -= take
        return torch.cat(parts)

    def state(self) -> tuple[dict[str, Tensor], dict[str, int]]:
        return ({"data.perm": self.perm, "rng.data": self.generator.get_state()},
                {"data_cursor": self.cursor, "data_epoch": self.epoch})

    def load_state(self, tensors: dict[str, Tensor], state: dict[str, Any]) -> None:
        """Continue from a checkpoint's order; one that cannot be this data's is a DataError naming the key."""
        perm, cursor = tensors["data.perm"], state["data_cursor"]
        if perm.ndim != 1 or perm.numel() != self.num_examples:
            raise DataError(f"the checkpoint's data order covers {perm.numel()} examples, "
                            f"the data now has {self.num_examples}; resume with the same data")
        if perm.dtype != torch.long or not torch.equal(perm.sort().values, torch.arange(self.num_examples)):
            raise DataError("the checkpoint's 'data.perm' is not a permutation of the examples; the state is damaged")
        if not 0 <= cursor <= self.num_examples:
            raise DataError(f"the checkpoint's 'data_cursor' = {cursor} lies outside 0..{self.num_examples}; "
                            f"the state is damaged")
        try:
            self.generator.set_state(tensors["rng.data"])
        except (RuntimeError, TypeError, ValueError):
            raise DataError("the checkpoint's 'rng.data' is not a generator state; the state is damaged") from None
        self.perm = perm.clone()
        self.cursor, self.epoch = int(cursor), int(state.get("data_epoch", 0))
