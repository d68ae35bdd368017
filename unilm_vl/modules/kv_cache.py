"""A preallocated key/value cache for incremental decoding (plain PyTorch).

torchscale's attention (and our SDPA shim of it) keeps a layer's past keys and values as ``prev_key`` /
``prev_value`` tensors and grows them with ``torch.cat`` at every generated token, which copies the whole cache each
step (O(T) bytes per step, O(T^2) per output); beam search then copies it again to reorder the rows. At small
batch sizes the decode step reads little more than the weights, so those copies are a visible share of its memory
traffic. :class:`KVCache` writes each step's keys/values into a buffer sized for the whole output instead, and
reorders rows with one ``index_select`` into a second buffer of the same size (the two are swapped), so a step
copies only its own keys/values.

Beam search reorders rows only among the beams of one input, and those beams share their prompt. When the cache is
told which prompt each row started from (``prefix_rows``), a reorder copies only the generated positions into the
spare buffer whenever the spare's rows already hold the right prompts (every step of a search whose row count did
not change); the prompt positions, often most of the cache, stay where they are.
"""

from __future__ import annotations

from typing import List, Optional, Sequence, Tuple

import torch


class KVCache:
    """The keys and values of one attention layer: ``N x H x capacity x d`` buffers, of which the first
    ``length`` positions are filled. :attr:`keys` / :attr:`values` are ``N x H x length x d`` views (no copy)."""

    def __init__(
        self,
        keys: torch.Tensor,
        values: torch.Tensor,
        capacity: int,
        prefix_rows: Optional[Sequence[int]] = None,
    ):
        """Start from the ``N x H x S x d`` keys/values of a prompt, with room for ``capacity`` positions in all
        (at least S; :meth:`append` grows the buffers by doubling if a step would overflow them).

        ``prefix_rows`` (N ids, optional): rows with the same id hold the same S prompt positions, bit for bit
        (copies of one prompt row, as a beam search's expansion makes them). Without it no row shares anything."""
        rows, heads, length, dim = keys.shape
        capacity = max(int(capacity), length)
        self._k = keys.new_empty(rows, heads, capacity, dim)  # N x H x C x d
        self._v = values.new_empty(rows, heads, capacity, dim)  # N x H x C x d
        self._k[:, :, :length] = keys
        self._v[:, :, :length] = values
        self.length = length
        self._spare: Tuple[torch.Tensor, torch.Tensor] | None = None  # reorder target, swapped with the buffers
        if prefix_rows is not None and len(prefix_rows) != rows:
            raise ValueError(f"prefix_rows names {len(prefix_rows)} rows for a cache of {rows}")
        self._shared = length if prefix_rows is not None else 0  # positions that rows of one id share
        self._ids: List[int] = list(prefix_rows) if prefix_rows is not None else list(range(rows))
        self._spare_ids: List[int] = []  # the prompt id held by each row of the spare buffer

    @property
    def capacity(self) -> int:
        return self._k.size(2)

    @property
    def keys(self) -> torch.Tensor:
        return self._k[:, :, : self.length]  # N x H x length x d

    @property
    def values(self) -> torch.Tensor:
        return self._v[:, :, : self.length]  # N x H x length x d

    def append(self, keys: torch.Tensor, values: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """Write ``N x H x t x d`` new keys/values after the filled positions; returns all keys and values."""
        step = keys.size(2)
        if self.length + step > self.capacity:
            self._grow(max(2 * self.capacity, self.length + step))
        self._k[:, :, self.length : self.length + step] = keys
        self._v[:, :, self.length : self.length + step] = values
        self.length += step
        return self.keys, self.values

    def reorder(self, order: torch.Tensor, order_list: Optional[List[int]] = None) -> None:
        """Rows become ``rows[order]`` (beam search: the surviving beams; fewer or more rows than before).
        ``order_list`` is ``order.tolist()`` when the caller has it (one host copy for all layers)."""
        order_list = order.tolist() if order_list is None else order_list
        rows = len(order_list)
        new_ids = [self._ids[i] for i in order_list]
        spare = self._spare
        if spare is None or spare[0].size(0) < rows or spare[0].size(2) != self.capacity:
            shape = (rows,) + tuple(self._k.shape[1:])
            spare = (self._k.new_empty(shape), self._v.new_empty(shape))
            self._spare_ids = []
        new_k, new_v = spare[0][:rows], spare[1][:rows]
        # the spare's rows already hold the prompts the new rows need: copy only the positions after them
        start = self._shared if self._spare_ids[:rows] == new_ids else 0
        torch.index_select(self._k[:, :, start : self.length], 0, order, out=new_k[:, :, start : self.length])
        torch.index_select(self._v[:, :, start : self.length], 0, order, out=new_v[:, :, start : self.length])
        self._spare, self._spare_ids = (self._k, self._v), self._ids
        self._k, self._v, self._ids = new_k, new_v, new_ids

    def _grow(self, capacity: int) -> None:
        old_k, old_v = self.keys, self.values
        shape = (self._k.size(0), self._k.size(1), capacity, self._k.size(3))
        self._k, self._v = self._k.new_empty(shape), self._v.new_empty(shape)
        self._k[:, :, : self.length] = old_k
        self._v[:, :, : self.length] = old_v
        self._spare, self._spare_ids = None, []
