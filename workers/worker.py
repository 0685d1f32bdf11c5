"""The worker: one Ray actor per device, holding one rank's shard of the model.

The driver (``cluster.engine.worker_group.WorkerGroup``) creates the actors, tells
each its place in the rank layout, brokers the rendezvous and then drives
them. Everything the worker returns is msgpack bytes or plain numbers.
"""

from __future__ import annotations

import functools
import json
import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path

import msgpack
import psutil
import torch

from layers.attention import AttnBatch
from layers.grammar import Grammars
from layers.linear import param_memory
from layers.models import build_model
from layers.platform import cpu_dtype, select_ops, use_ops
from workers.host_memory import HugePageArena, retain_freed_memory
from workers.comm import (Communicator, Rendezvous, create_communicator, find_free_port,
                          ordered_sums)
from workers.cuda_graphs import DecodeGraphs
from workers import kv_cache
from workers.loader import load_shard
from workers.model_runner import ModelRunner, run_stage
from cluster.contract.messages import StepPlan

log = logging.getLogger("shardlm.worker")
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


@dataclass
class WorkerSpec:
    """A worker's place in the rank layout and how it runs (plain values, sent once)."""

    deployment: str
    pp_rank: int
    tp_rank: int
    tp_size: int
    pp_size: int
    device: str  # "cpu" or "cuda"
    threads: int | None = 1  # None: set later by share_cores
    layer_range: tuple[int, int] | None = None  # this stage's layers [first, end); None: all
    poison_token: int | None = None  # fault injection: a step holding this token raises
    expert_parallel: bool = False  # Mixture-of-Experts: whole experts per rank (layers.moe)
    poison_hang_s: float = 0.0  # fault injection: such a step hangs this long instead

    @property
    def name(self) -> str:
        return f"{self.deployment}-worker-{self.pp_rank}-{self.tp_rank}"


class Worker:
    """Ray actor body (wrapped with ``ray.remote`` by the worker group)."""

    def __init__(self, spec: dict):
        self.spec = WorkerSpec(**spec)
        if self.spec.device == "cpu":
            torch.set_num_threads(self.spec.threads or 1)
            retain_freed_memory()
        self.device = torch.device("cuda", 0) if self.spec.device == "cuda" else torch.device("cpu")
        self.tp_comm: Communicator | None = None
        self.pp_comm: Communicator | None = None  # rank r of every stage (pipeline hand-off)
        self.model = None
        self.dtype = torch.float32
        self.hf_config: dict | None = None
        self.runner: ModelRunner | None = None
        self.grammars: Grammars | None = None  # structured output, on the sampling rank
        self.checkpoint: str | None = None
        self.ops = None  # the platform's ops (layers.platform.select_ops), chosen at load
        self.hang_next_step_s = 0.0  # fault injection (cluster.tools.chaos): stall inside a step

    # ---- layout and rendezvous -------------------------------------------------------------
    def address(self) -> dict:
        """Where this worker runs: node IP and id, a free port on it, the process id."""
        import ray

        ip = ray.util.get_node_ip_address()
        return {"ip": ip, "node_id": ray.get_runtime_context().get_node_id(),
                "port": find_free_port(ip), "pid": os.getpid()}

    def init_comm(self, kind: str, backend: str, host: str, port: int, group_id: str,
                  socket_ifname: str | None = None, timeout_s: float = 300.0,
                  shm_slot_bytes: int | None = None) -> str:
        """Join this worker's tensor-parallel (``kind="tp"``) or pipeline (``"pp"``) group."""
        set_socket_ifname(socket_ifname)
        rdv = Rendezvous(host, port, group_id)
        rank, size = ((self.spec.tp_rank, self.spec.tp_size) if kind == "tp"
                      else (self.spec.pp_rank, self.spec.pp_size))
        comm = create_communicator(backend, rank, size, rdv, self.device, timeout_s,
                                   shm_slot_bytes=shm_slot_bytes)
        setattr(self, f"{kind}_comm", comm)
        return comm.backend

    def share_cores(self, workers_on_node: int) -> int:
        """Use this node's share of cores: the cores this process may run on, split over the
        ``workers_on_node`` workers of the gang here; returns the threads set."""
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
        threads = max(1, (cores or 1) // max(1, workers_on_node))
        if self.spec.device == "cpu":
            torch.set_num_threads(threads)
        return threads

    # ---- weights ---------------------------------------------------------------------------
    def load(self, checkpoint: str, dtype: str = "float32", quantization: str | None = None,
             deterministic: bool = False) -> dict:
        """Build this rank's piece of the model and fill it from the checkpoint. ``dtype``
        "auto" (CPU workers: the driver resolves it for GPUs) is this CPU's own choice
        (:func:`layers.platform.cpu_dtype`); ``quantization`` int8 quantizes the linear
        weights after loading them in bf16; ``deterministic``: batch-invariant kernels, and
        the tensor-parallel sums in rank order (or a ValueError naming what cannot)."""
        self.model = self.runner = None  # drop a previous model before measuring
        if dtype == "auto":  # reaches CPU workers only: the driver resolves it for GPUs
            dtype = cpu_dtype()
        weights_dtype = DTYPES[dtype]
        ops = select_ops(self.device, weights_dtype, quantization, deterministic)
        if deterministic:
            self.tp_comm = ordered_sums(self.tp_comm)
        build_dtype = torch.bfloat16 if quantization else weights_dtype  # int8 made from bf16
        rss_before = rss_bytes()
        started = time.perf_counter()
        self.hf_config = json.loads((Path(checkpoint) / "config.json").read_text())
        self.checkpoint, self.grammars = checkpoint, None
        layer_range = tuple(self.spec.layer_range) if self.spec.layer_range else None
        # CPU weights on huge pages (a CPU pass streams them all); GPU weights made on the GPU
        # and filled there shard by shard, never whole on the host
        zeros = (HugePageArena().zeros if self.device.type == "cpu"
                 else functools.partial(torch.zeros, device=self.device))
        with param_memory(zeros):
            model = build_model(self.hf_config, self.tp_comm, build_dtype, layer_range,
                                self.spec.expert_parallel, tp_invariant=deterministic)
        stats = load_shard(model, checkpoint)
        self.model = model.to(self.device).eval()  # the buffers (rotary frequencies)
        self.ops = ops  # the platform, once for this worker
        packed = use_ops(self.model, self.ops)
        self.dtype = ops.kv_cache_dtype or ops.activation_dtype or build_dtype  # the KV cache's
        return {"bytes_read": stats.bytes_read, "checkpoint_bytes": stats.checkpoint_bytes,
                "packed_weights": packed, "ops": self.ops.name, "dtype": dtype,
                "kernel_isa": getattr(self.ops, "isa", None),
                "quantization": quantization, "deterministic": deterministic, "rss_before": rss_before, "rss_after": rss_bytes(),
                "load_s": time.perf_counter() - started,
                "loaded": sorted(name for name, _ in stats.loaded)}

    # ---- forward ---------------------------------------------------------------------------
    @torch.inference_mode()
    def forward_logits(self, request: bytes) -> bytes | None:
        """Logits at every position of whole sequences (no KV cache).

        request: msgpack list of token-id lists. TP rank 0 answers msgpack
        ``{"shape": [tokens, vocab], "data": float32 bytes}``; other ranks None.
        """
        seqs = msgpack.unpackb(request)
        ids = torch.tensor([t for s in seqs for t in s], dtype=torch.int64, device=self.device)
        positions = torch.tensor([p for s in seqs for p in range(len(s))], dtype=torch.int64,
                                 device=self.device)
        batch = AttnBatch([len(s) for s in seqs], [0] * len(seqs))
        with kv_cache.set_aside(self.model):  # a running engine's cache stays as it was
            hidden = run_stage(self.model, self.pp_comm, ids, positions, batch)
        if hidden is None:  # not the last stage: handed on to the next one
            return None
        logits = self.model.compute_logits(hidden)  # (tokens, vocab) on TP rank 0
        if logits is None:
            return None
        logits = logits.float().cpu().contiguous()
        return msgpack.packb({"shape": list(logits.shape), "data": logits.numpy().tobytes()})

    # ---- KV cache and steps -----------------------------------------------------------------
    def cache_capacity(self, block_size: int, sizing: dict) -> int:
        """Blocks this rank could hold (the driver allocates the minimum over all ranks).

        sizing: ``cache_bytes`` (a fixed budget, or None), ``fraction`` (CPU: of free
        memory), ``gpu_memory_utilization``, and the largest step (``profile_tokens``,
        ``profile_seqs``) that a GPU worker runs once to measure its activations' peak."""
        if sizing["cache_bytes"] is not None:
            budget = sizing["cache_bytes"]
        elif self.device.type == "cuda":
            budget = self._profile_gpu_budget(sizing)
        else:
            budget = kv_cache.host_budget(sizing["fraction"])
        return kv_cache.blocks_that_fit(self.model, block_size, self.dtype, budget)

    @torch.inference_mode()
    def _profile_gpu_budget(self, sizing: dict) -> int:
        kv_cache.release(self.model)
        self.runner = None
        torch.cuda.empty_cache()
        allocated = torch.cuda.memory_allocated(self.device)
        torch.cuda.reset_peak_memory_stats(self.device)
        profile_forward(self.model, self.pp_comm, sizing["profile_tokens"],
                        sizing["profile_seqs"], self.device)
        torch.cuda.synchronize(self.device)
        peak = torch.cuda.max_memory_allocated(self.device)
        torch.cuda.empty_cache()
        free, total = torch.cuda.mem_get_info(self.device)
        return kv_cache.gpu_budget(total, free, allocated, peak, sizing["gpu_memory_utilization"])

    def allocate_cache(self, num_blocks: int, block_size: int, graphs: dict | None = None) -> dict:
        """Allocate the KV cache and set up the step runner. graphs: ``max_batch`` and
        ``max_blocks`` of the decode steps to capture in CUDA graphs (None: eager)."""
        self.runner = None
        kv_cache.release(self.model)
        allocated = kv_cache.allocate(self.model, num_blocks, block_size, self.dtype, self.device)
        decode_graphs = None
        if graphs is not None and self._graphs_possible():
            started = time.perf_counter()
            decode_graphs = DecodeGraphs(self.model, graphs["max_batch"], graphs["max_blocks"],
                                         self.device, capture=self.device.type == "cuda")
            decode_graphs.capture_all()
            log.info("captured %d decode graphs in %.1f s", len(decode_graphs.sizes),
                     time.perf_counter() - started)
        self.runner = ModelRunner(self.model, block_size, self.device, self.pp_comm,
                                  self.tp_comm, decode_graphs, self._grammars(), self.ops)
        return {"bytes": allocated,
                "cuda_graphs": decode_graphs.sizes if decode_graphs is not None else []}

    def _grammars(self) -> Grammars | None:
        """Structured output's grammars, on the rank that samples (the last stage's TP rank 0)."""
        if self.grammars is None and self.model.is_last and (
                self.tp_comm is None or self.tp_comm.rank == 0):
            self.grammars = Grammars(self.checkpoint, self.hf_config["vocab_size"])
        return self.grammars

    def _graphs_possible(self) -> bool:
        """CUDA graphs need ops that read no host value in a decode step, one pipeline stage
        (the hand-off between stages stays outside graphs) and a tensor-parallel
        communicator whose calls run on torch's current stream. (A CPU worker gets them only
        with the CUDA kernels forced, ``SHARDLM_OPS=triton``: then the same padded buffers
        run eagerly.)"""
        return (self.ops.graph_safe and self.model.graph_safe
                and (self.pp_comm is None or self.pp_comm.world_size == 1)
                and (self.tp_comm is None or self.tp_comm.world_size == 1
                     or getattr(self.tp_comm, "graph_safe", False)))

    def execute(self, plan: bytes) -> bytes | None:
        """Run one step; the sampling rank answers StepResult bytes, the others None."""
        if self.hang_next_step_s:  # injected hang: the peers wait in their first collective
            time.sleep(self.hang_next_step_s)
            self.hang_next_step_s = 0.0
        step = StepPlan.decode(plan)
        poison = self.spec.poison_token
        if poison is not None and any(poison in c.token_ids for c in step.chunks):
            if self.spec.poison_hang_s:
                time.sleep(self.spec.poison_hang_s)
            raise RuntimeError(f"fault injected: the step holds token {poison} "
                               "(fault.poison_token_id)")
        result = self.runner.execute(step)
        return None if result is None else result.encode()

    # ---- health ----------------------------------------------------------------------------
    def ping(self) -> dict:
        return {"pid": os.getpid(), "rss": rss_bytes(), "threads": torch.get_num_threads()}

    def chaos_hang(self, seconds: float) -> None:
        """Fault injection: make the next step stall for ``seconds`` (see cluster.tools.chaos)."""
        self.hang_next_step_s = float(seconds)

    def close(self) -> None:
        for kind in ("tp", "pp"):
            comm = getattr(self, f"{kind}_comm")
            if comm is not None:
                comm.close()
                setattr(self, f"{kind}_comm", None)


def profile_forward(model, pp_comm, tokens: int, seqs: int, device: torch.device) -> None:
    """The largest step the scheduler may send, without a KV cache: ``tokens`` prompt tokens
    (as one sequence per ``seqs`` share) through every layer, then logits for ``seqs`` rows
    (measures the activations' peak; every rank runs it together)."""
    seqs = max(1, min(seqs, tokens))
    lens = [tokens // seqs + (i < tokens % seqs) for i in range(seqs)]
    ids = torch.zeros(tokens, dtype=torch.int64, device=device)
    positions = torch.cat([torch.arange(n, device=device) for n in lens])
    hidden = run_stage(model, pp_comm, ids, positions, AttnBatch(lens, [0] * seqs))
    if hidden is not None:
        model.compute_logits(hidden[:seqs])


def rss_bytes() -> int:
    return psutil.Process().memory_info().rss


def set_socket_ifname(override: str | None) -> None:
    """Point Gloo and NCCL at the interface that carries this node's Ray IP.

    Gloo otherwise resolves the host name, which can map to 127.0.0.1 and break
    rendezvous across hosts (see docs/ARCHITECTURE.md, "Across hosts").
    """
    import ray

    if override:
        os.environ["GLOO_SOCKET_IFNAME"] = os.environ["NCCL_SOCKET_IFNAME"] = override
        return
    name = interface_of(ray.util.get_node_ip_address())
    if name:  # an operator's own setting wins
        os.environ.setdefault("GLOO_SOCKET_IFNAME", name)
        os.environ.setdefault("NCCL_SOCKET_IFNAME", name)


def interface_of(ip: str) -> str | None:
    for name, addrs in psutil.net_if_addrs().items():
        if any(a.address == ip for a in addrs):
            return name
    return None


def decode_logits(data: bytes) -> torch.Tensor:
    msg = msgpack.unpackb(data)
    return torch.frombuffer(bytearray(msg["data"]), dtype=torch.float32).view(*msg["shape"])
