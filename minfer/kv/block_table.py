"""Every sequence's block table as one row of a persistent tensor, updated as blocks are appended.

The block manager (``block_pool.py``) keeps each table as a Python list: that is
the bookkeeping (prefix hashes, copy-on-write, freeing). The forward needs the
same tables as a tensor. Rebuilding that tensor from the lists on every step
costs one small copy per sequence per step; instead the manager writes each
change here once, when it happens (a new block appended, a copy-on-write swap),
and the runner only *indexes* the rows of the sequences in the step::

    row  seq   table (cols grow on demand; entries past a sequence's end are masked)
     0   A     [ 2  0  4  .  . ]
     1   (free: its row is handed to the next sequence)
     2   B     [ 1  5  .  .  . ]

    batch [B, A] -> rows [2, 0] -> block_tables = table[[2, 0], :ceil(max seq_len / bs)]

On a GPU the table lives twice: the host copy the manager writes, and a
device copy refreshed by one host-to-device copy per step when something
changed (``device_table``). vLLM: ``vllm/v1/worker/block_table.py``
(``BlockTable``: ``block_table_cpu``, ``append_row``, ``commit_block_table``).
"""
from __future__ import annotations

from typing import Sequence

import torch

from minfer.devices import to_device


class BlockTableTensor:
    """Rows of block ids, one row per live sequence; the host copy is ``cpu`` (rows, cols) long."""

    def __init__(self, rows: int = 8, cols: int = 8, device="cpu"):
        self.device = torch.device(device)
        self.cpu = torch.zeros(rows, cols, dtype=torch.long)          # (rows, cols) the host copy
        self._device = self.cpu if self.device.type == "cpu" else None  # the device copy (lazy)
        self._free = list(range(rows - 1, -1, -1))                    # free rows, lowest on top
        self._dirty = True

    def add_row(self, block_ids: Sequence[int]) -> int:
        """A row for a new sequence holding ``block_ids``; returns the row."""
        if not self._free:                                            # double the rows
            old = self.cpu.shape[0]
            self._resize(2 * old, self.cpu.shape[1])
            self._free = list(range(2 * old - 1, old - 1, -1))
        row = self._free.pop()
        self.write(row, 0, block_ids)
        return row

    def write(self, row: int, start: int, block_ids: Sequence[int]) -> None:
        """Entries ``start .. start + len(block_ids)`` of ``row`` become ``block_ids``."""
        end = start + len(block_ids)
        if end > self.cpu.shape[1]:                                   # double the columns
            self._resize(self.cpu.shape[0], max(end, 2 * self.cpu.shape[1]))
        if block_ids:
            self.cpu[row, start:end] = torch.tensor(block_ids, dtype=torch.long)
            self._dirty = True

    def free_row(self, row: int) -> None:
        self.cpu[row] = 0             # any valid id would do (read whole, then masked); zeros read better
        self._free.append(row)
        self._dirty = True

    def _resize(self, rows: int, cols: int) -> None:
        new = torch.zeros(rows, cols, dtype=torch.long)
        new[:self.cpu.shape[0], :self.cpu.shape[1]] = self.cpu
        self.cpu = new
        if self.device.type == "cpu":
            self._device = new
        else:
            self._device, self._dirty = None, True

    def device_table(self) -> torch.Tensor:
        """The table on ``device``: the host copy itself on CPU; elsewhere refreshed if it changed."""
        if self._device is None:
            self._device = torch.empty_like(self.cpu, device=self.device)
        if self._dirty and self._device is not self.cpu:
            # one copy per step, not per sequence; from a pinned snapshot, not waited for (the host
            # may write the table again before the device has read it: forks do, in the same step)
            self._device.copy_(to_device(self.cpu, self.device))    # pin_memory() copies: a snapshot
        self._dirty = False
        return self._device
