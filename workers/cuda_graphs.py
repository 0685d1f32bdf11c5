"""Decode steps replayed from CUDA graphs, one graph per batch-size bucket.

A decode step (every sequence one new token) is captured once per bucket size over
persistent input buffers: token ids, positions, KV slots, block tables, context lengths and
query starts. A step of ``n`` sequences copies its inputs into the first ``n`` rows of the
smallest bucket that holds it; the padding rows get slot -1 (the KV append skips them) and
context 0 (attention reads nothing for them), and their outputs are dropped. Collectives
run inside the graph, so a tensor-parallel group is captured only when its communicator
issues its calls on torch's current stream (``graph_safe``); sampling stays outside.

Used only where the platform's ops read no host value in a decode step
(``ops.graph_safe``: the triton kernels) and ``model.enforce_eager`` is off. With
``capture=False`` the same buffers and padding run eagerly: that is how the CPU test suite
checks everything here except the capture itself.
"""

from __future__ import annotations

import torch

from layers.attention import AttnBatch

BUCKETS = (1, 2, 4, 8, 16, 24, 32, 48, 64, 96, 128, 160, 192, 224, 256)


def bucket_sizes(max_batch: int) -> list[int]:
    """The captured batch sizes: the standard buckets below ``max_batch``, then it."""
    return [b for b in BUCKETS if b < max_batch] + [max_batch]


class DecodeGraphs:
    def __init__(self, model: torch.nn.Module, max_batch: int, max_blocks: int,
                 device: torch.device, capture: bool = True):
        self.model, self.device, self.capture = model, device, capture
        self.sizes = bucket_sizes(max_batch)
        self.max_batch = self.sizes[-1]

        def buffer(*shape, fill=0):
            return torch.full(shape, fill, dtype=torch.int64, device=device)

        self.input_ids = buffer(self.max_batch)
        self.positions = buffer(self.max_batch)
        self.slots = buffer(self.max_batch, fill=-1)
        self.block_tables = buffer(self.max_batch, max_blocks)
        self.context_lens = buffer(self.max_batch)
        self.query_starts = torch.arange(self.max_batch + 1, dtype=torch.int64, device=device)
        self.graphs: dict[int, object] = {}  # size -> torch.cuda.CUDAGraph
        self.outputs: dict[int, torch.Tensor] = {}  # size -> (size, hidden) graph output
        self._pool = None

    def handles(self, batch: AttnBatch) -> bool:
        n = len(batch.query_lens)
        return (0 < n <= self.max_batch and batch.max_query_len == 1
                and batch.block_tables.shape[1] <= self.block_tables.shape[1])

    def run(self, input_ids: torch.Tensor, positions: torch.Tensor, batch: AttnBatch
            ) -> torch.Tensor:
        """The model's hidden states (n, hidden) for a decode step of n sequences."""
        n = len(batch.query_lens)
        size = next(s for s in self.sizes if s >= n)
        self._fill(input_ids, positions, batch, n, size)
        if not self.capture:
            return self._forward(size)[:n]
        if size not in self.graphs:
            self._capture(size)
        self.graphs[size].replay()
        return self.outputs[size][:n]

    def capture_all(self) -> None:
        """Capture every bucket, largest first (the smaller ones reuse its memory pool)."""
        if self.capture:
            for size in reversed(self.sizes):
                self._capture(size)

    def _fill(self, input_ids, positions, batch: AttnBatch, n: int, size: int) -> None:
        width = batch.block_tables.shape[1]
        self.input_ids[:n].copy_(input_ids, non_blocking=True)
        self.positions[:n].copy_(positions, non_blocking=True)
        self.slots[:n].copy_(batch.slot_mapping, non_blocking=True)
        self.block_tables[:n, :width].copy_(batch.block_tables, non_blocking=True)
        self.context_lens[:n].copy_(batch.context_lens_tensor(), non_blocking=True)
        if size > n:  # padding rows: no KV written, nothing attended
            self.slots[n:size].fill_(-1)
            self.context_lens[n:size].zero_()

    def _batch(self, size: int) -> AttnBatch:
        # the host-side lists only say "one token per sequence": the kernels read the tensors
        return AttnBatch([1] * size, [0] * size, self.block_tables[:size], self.slots[:size],
                         _context_lens=self.context_lens[:size],
                         _query_starts=self.query_starts[:size + 1])

    def _forward(self, size: int) -> torch.Tensor:
        return self.model(self.input_ids[:size], self.positions[:size], self._batch(size))

    def _capture(self, size: int) -> None:
        self.slots[:size].fill_(-1)  # warm-up and capture write no KV and read none
        self.context_lens[:size].zero_()
        side = torch.cuda.Stream(self.device)
        side.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(side):  # compile the kernels and settle the allocator first
            for _ in range(2):
                self._forward(size)
        torch.cuda.current_stream(self.device).wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self._pool):
            self.outputs[size] = self._forward(size)
        self._pool = graph.pool()
        self.graphs[size] = graph
