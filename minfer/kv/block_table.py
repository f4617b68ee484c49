"""Every sequence's block table as one row of a persistent tensor, updated as blocks are appended.

The block manager writes each change once, when it happens; the runner only indexes the rows
of the step's sequences. vLLM: ``vllm/v1/worker/block_table.py`` (``BlockTable``).
Diagram: docs/kv-and-attention.md.
"""
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
