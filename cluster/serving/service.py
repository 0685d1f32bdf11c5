"""The engine as a long-lived service: a detached, named Ray actor.

One thread owns the Engine and runs its step loop on token ids; another turns them into
the callers' events (text, stop strings, logprobs:
:mod:`cluster.serving.output_processor`); the actor's asyncio side
takes requests from many callers at once (the Serve app, ``connect()``
handles in other processes; both through :class:`cluster.serving.stream.RequestStream`)
and streams their events back (:mod:`cluster.contract.events`).

Cancelling a caller's stream aborts its request and frees its KV blocks.
"""

from __future__ import annotations

import asyncio
import logging
import os
import queue
from concurrent.futures import ThreadPoolExecutor
import threading
import time
import traceback
import uuid

import msgpack
import ray

from cluster.contract import events
from cluster.contract.config import EngineConfig
from cluster.contract.errors import EngineUnavailable
from cluster.engine.admission import grammar_error
from cluster.serving.metrics import EngineMetrics
from cluster.serving.output_processor import OutputProcessor

log = logging.getLogger("shardlm.service")
# Control calls (health, abort, stats, metrics, ...) run in a concurrency group of their own,
# so that streams never starve them; generate() gets max_open_requests slots plus a few in
# which to refuse the requests past the bound at once.
CONTROL_CALLS = 16
REFUSAL_SLOTS = 32
control = ray.method(concurrency_group="control")


class EngineService:
    """Body of the detached actor; see :func:`get_or_start_service`."""

    def __init__(self, config: dict):
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
        self.config = EngineConfig.from_dict(config)
        # this actor instance: Ray keeps the name and handles across a restart, so a caller
        # whose stream broke tells a live engine from its replacement by this (health())
        self.incarnation = uuid.uuid4().hex
        self.engine = None  # cluster.engine.engine.Engine, once started
        self.status, self.reason = "starting", "loading the model onto the workers"
        self.metrics = EngineMetrics(self.config.model.model, self.config.deployment.name)
        self._commands: queue.Queue = queue.Queue()
        self.outputs = None  # cluster.serving.output_processor.OutputProcessor, with the engine
        self._retry_at: float | None = None  # failed: when the engine thread tries again
        self._open = 0  # requests submitted and not ended (see deployment.max_open_requests)
        # submit()/subscribe(): each subscriber's feed of events, and which feed each
        # submitted request's events go to
        self._feeds: dict[str, asyncio.Queue] = {}
        self._routes: dict[str, _Route] = {}
        self._started = time.time()
        self._tokenizers = ThreadPoolExecutor(2, thread_name_prefix="shardlm-tokenize")
        self._thread = threading.Thread(target=self._main, name="shardlm-engine", daemon=True)
        self._thread.start()

    # ---- the engine thread -----------------------------------------------------------------
    def _main(self) -> None:
        # imported here, not at the top: a client's ray.get_actor unpickles this class, which
        # imports this module, and a client needs no torch (docs/ARCHITECTURE.md)
        from cluster.engine.engine import Engine

        try:
            while True:  # "failed" is never final: the service replaces a failed engine
                self._start(Engine)
                self._serve()
                self._retire()
        except BaseException:  # the barrier: never a silent dead thread behind "ready"
            self._die("the engine thread failed")

    def _start(self, Engine) -> None:
        """Start an engine, trying again with backoff (``fault.start_backoff_s`` doubling up to
        ``fault.start_backoff_max_s``) until one starts: a checkpoint not there yet, or capacity
        that comes back, heals by itself, since Ray does not replace a live actor. Meanwhile
        health says failed with the reason and when the next try is, and requests are
        refused."""
        fault = self.config.fault
        backoff = fault.start_backoff_s
        while True:
            self.status, self.reason = "starting", "loading the model onto the workers"
            try:
                engine = Engine(self.config, detokenize=False, online=True)
                break
            except Exception as exc:
                self._retry_at = time.monotonic() + backoff
                self.status, self.reason = "failed", f"engine start failed: {exc}"
                log.error("%s; next try in %.0fs\n%s", self.reason, backoff,
                          traceback.format_exc())
                self._wait(self._retry_at)
                backoff = min(backoff * 2, fault.start_backoff_max_s)
        self._retry_at = None
        if self.outputs is None:  # one output thread for the service's life, over engines
            self.outputs = OutputProcessor(
                engine.tokenizer,
                on_stop=lambda rid, index, stop: self._commands.put(
                    lambda: self._stop_choice(rid, index, stop)),
                on_error=lambda rid: self._commands.put(lambda: self._forget(rid)))
        self.engine = engine
        self.status, self.reason = "ready", None
        log.info("engine ready: %s at tp=%d", self.config.model.model,
                 self.config.parallel.tensor_parallel_size)

    def _serve(self) -> None:
        """Step the engine until its supervisor gives up on its gang (``fault.max_restarts``;
        it has then failed every request it held)."""
        while self.engine.status != "failed":
            self._drain_commands(block=not self.engine.has_unfinished())
            if self.engine.has_unfinished():
                self._step()
            self.metrics.observe_engine(self.engine)

    def _retire(self) -> None:
        """An engine that gave up refuses requests for ``fault.restart_window_s`` (the restart
        budget bounds how often gangs are rebuilt, it does not end the service), then a new
        engine starts. Its gang goes at once: survivors of the failed one would hold their
        devices and placement meanwhile."""
        engine, window = self.engine, self.config.fault.restart_window_s
        self._retry_at = time.monotonic() + window
        log.error("the engine gave up (%s); a new engine in %.0fs (fault.restart_window_s)",
                  engine.reason, window)
        engine.shutdown()
        self._wait(self._retry_at)
        self.status, self.reason = "starting", "loading the model onto the workers"
        self.engine = None

    def _wait(self, until: float) -> None:
        """Until ``until`` (monotonic), run commands: admissions are refused meanwhile."""
        while time.monotonic() < until:
            self._drain_commands(block=True)

    def _die(self, why: str) -> None:
        """An error the engine cannot contain (its state is no longer trusted): end the actor's
        process. Ray restarts the actor with a new engine, and every caller's stream resumes
        its request there from its journal (cluster.serving.stream)."""
        self.status, self.reason = "failed", why
        log.critical("%s; exiting so that Ray restarts the engine\n%s", why,
                     traceback.format_exc())
        logging.shutdown()
        os._exit(70)

    def _drain_commands(self, block: bool) -> None:
        try:
            command = self._commands.get(timeout=0.1) if block else self._commands.get_nowait()
        except queue.Empty:
            return
        while True:
            command()
            try:
                command = self._commands.get_nowait()
            except queue.Empty:
                return

    def _step(self) -> None:
        deltas = self.engine.step()
        now = time.monotonic()
        finished = {}
        for delta in deltas:
            request = self.engine.requests.get(delta.request_id)
            if request is None:
                continue
            self._observe_token(request, now)
            if request.finished:  # closed once every delta of this step is handed over (n > 1)
                finished[request.request_id] = request
        self.outputs.step(deltas)
        for request in finished.values():
            self._finish(request, now)

    def _observe_token(self, request, now: float) -> None:
        self.metrics.generation_tokens.inc()
        last = request.last_token_time
        if last is None:
            self.metrics.ttft.observe(now - request.arrival_time)
        else:
            self.metrics.tpot.observe(now - last)
        request.last_token_time = now

    def _finish(self, request, now: float) -> None:
        self.metrics.e2e.observe(now - request.arrival_time)
        self.outputs.finish(self.engine.pop_finished(request.request_id))

    def _stop_choice(self, request_id: str, index: int, stop: str) -> None:
        """On the engine thread: a stop string the output thread found ends that choice."""
        if self.engine is None:  # its engine was replaced meanwhile (it failed the request)
            return
        if self.engine.stop_choice(request_id, index, stop):
            self._finish(self.engine.requests[request_id], time.monotonic())

    # ---- the actor's API -------------------------------------------------------------------
    async def generate(self, request: bytes):
        """Stream one request's events (encoded, see :mod:`cluster.contract.events`): a
        subscription of its own (:meth:`subscribe`) holding that one request; a caller that
        goes away has it aborted, even during its admission."""
        subscriber = f"stream-{uuid.uuid4().hex}"
        feed = self._feed(subscriber)
        submitting = asyncio.ensure_future(self.submit(request, subscriber))
        try:
            while True:
                _, data, last = await feed.get()
                if data is None:  # its request was taken back by a new stream (_take_back)
                    return
                yield data
                if last:
                    return
        finally:
            self._drop(subscriber)
            if not submitting.done():  # still being admitted: drop what it routes then
                submitting.add_done_callback(lambda _: self._drop(subscriber))

    async def subscribe(self, subscriber: str):
        """Stream the events of every request submitted under ``subscriber`` (:meth:`submit`),
        batched: an item holds what is ready, msgpack ``[[request_id, event bytes, last], ...]``
        (an API replica reads one stream for all its requests instead of one per request: a
        step's tokens travel as one item). When the subscriber goes away, its requests are
        aborted."""
        feed = self._feed(subscriber)
        try:
            while True:
                batch = [await feed.get()]
                while not feed.empty():
                    batch.append(feed.get_nowait())
                if batch[-1][1] is None:  # its caller is gone and its requests taken back
                    return
                yield msgpack.packb(batch)
        finally:
            self._drop(subscriber)

    async def submit(self, request: bytes, subscriber: str) -> str:
        """Start a request (as :meth:`generate` takes it) whose events go to ``subscriber``'s
        stream (:meth:`subscribe`), an error event included. Returns :attr:`incarnation`."""
        feed = self._feed(subscriber)
        self._open += 1
        try:
            self._refuse_if_unavailable()
            body = events.decode_request(request)
        except Exception as exc:
            self._open -= 1
            feed.put_nowait([_request_id_of(request), events.encode(events.error_event(exc)), True])
            return self.incarnation
        request_id, loop = body["request_id"], asyncio.get_running_loop()
        if self._taken_back(body):
            self._take_back(request_id)
        route = self._routes[request_id] = _Route(self, feed, request_id, subscriber)
        try:
            body["tokenized"] = await self._tokenize(loop, body)
            body["grammar"] = await self._grammar(body)
        except Exception as exc:
            route.put_nowait(events.error_event(exc))
            return
        admitted = loop.create_future()
        self._commands.put(lambda: self._admit(body, loop, route, admitted))
        result = await asyncio.shield(admitted)
        if isinstance(result, dict):  # an error event
            route.put_nowait(result)
        elif request_id not in self._routes:  # aborted while it was being admitted
            self._commands.put(lambda: self._forget(request_id))
        return self.incarnation

    def _taken_back(self, body: dict) -> bool:
        """A resume sent to this very incarnation: its caller's stream broke with this engine
        alive (a transient Ray error), and the caller takes its request back from here."""
        return body["resume"] is not None and body.get("incarnation") == self.incarnation

    def _take_back(self, request_id: str) -> None:
        """Before a taken-back request is routed: the copy still held gives way (its slot, its
        route; _admit drops it from the engine on the engine thread). The events it sent since
        the break went to a stream its caller no longer reads; the caller's journal holds what
        arrived. A subscriber left with no request (its caller's side of the stream is broken)
        is ended, else its generator would wait on its feed for ever."""
        route = self._routes.get(request_id)
        if route is None:  # already ended here, or never admitted: nothing to replace
            return
        self._unroute(request_id)
        if not any(r.subscriber == route.subscriber for r in self._routes.values()):
            route.feed.put_nowait([request_id, None, True])

    def _feed(self, subscriber: str) -> asyncio.Queue:
        return self._feeds.setdefault(subscriber, asyncio.Queue())

    def _drop(self, subscriber: str) -> None:
        """A subscriber gone: its feed, and its requests still running aborted."""
        self._feeds.pop(subscriber, None)
        for request_id in [r for r, route in self._routes.items()
                           if route.subscriber == subscriber]:
            self._unroute(request_id)
            self._commands.put(lambda rid=request_id: self._forget(rid))

    def _unroute(self, request_id: str) -> None:
        if self._routes.pop(request_id, None) is not None:
            self._open -= 1

    async def _tokenize(self, loop, body: dict) -> list[int] | None:
        """The prompt's token ids from text or chat messages, made in the tokenizer pool
        (None: token ids given, or the engine not started yet: admission makes them)."""
        engine = self.engine
        if engine is None or (body["prompt"] is None and body["messages"] is None):
            return None
        return await loop.run_in_executor(self._tokenizers, engine.admission.prompt_ids,
                                          body["prompt"], body["prompt_token_ids"],
                                          body["messages"], body.get("tools"))

    async def _grammar(self, body: dict):
        """The request's structured output compiled (``layers.grammar.Compiled``), off the
        engine thread: the request waits for it here while every other stream goes on (None:
        none asked, or the engine not started yet: admission compiles it). A RequestError
        when it does not compile, or not within ``scheduler.grammar_compile_timeout_s``."""
        engine = self.engine
        future = None if engine is None else engine.grammar(body["params"])
        if future is None:
            return None
        limit = self.config.scheduler.grammar_compile_timeout_s
        try:  # shielded: other requests may wait for the same compilation
            return await asyncio.wait_for(asyncio.shield(asyncio.wrap_future(future)), limit)
        except Exception as exc:
            raise grammar_error(exc, limit) from None

    def _forget(self, request_id: str) -> None:
        """On the engine thread: abort a request whose caller went away, and drop its stream."""
        if self.engine is not None:  # none: between engines, where no request runs
            self.engine.abort(request_id)
        if self.outputs is not None:
            self.outputs.close(request_id)

    def _refuse_if_unavailable(self) -> None:
        """EngineUnavailable when the engine cannot take a request now."""
        status, reason = self._status()
        if status == "failed":
            retry = self._retry_in_s()
            raise EngineUnavailable(f"the engine is not serving: {reason}"
                                    + ("" if retry is None else f"; it tries again in {retry:.0f} s"))
        bound = self.config.deployment.max_open_requests
        if self._open > bound:
            raise EngineUnavailable(f"the engine service holds {self._open - 1} open requests "
                                    f"(deployment.max_open_requests={bound}); retry later")
        if status != "ready" and self._commands.qsize() >= self.config.fault.max_queued_requests:
            raise EngineUnavailable(
                f"the engine is {status} ({reason}) and {self._commands.qsize()} requests are "
                "already queued (fault.max_queued_requests); retry later")

    def _not_serving(self) -> EngineUnavailable:
        """The refusal while no engine exists (starting, or its start failed)."""
        return EngineUnavailable(f"the engine is not serving: {self.reason}")

    def _status(self) -> tuple[str, str | None]:
        engine = self.engine  # once: the engine thread may replace it meanwhile
        if engine is None:
            return self.status, self.reason
        return engine.status, engine.reason

    def _admit(self, body: dict, loop, queue_: asyncio.Queue, admitted: asyncio.Future) -> None:
        """On the engine thread: admit the request (its id) or say why not (an error event)."""
        try:
            if self.engine is None:  # queued while starting, and the start failed
                raise self._not_serving()
            if self._taken_back(body) and body["request_id"] in self.engine.requests:
                self._forget(body["request_id"])  # the copy it replaces (see _take_back)
            request_id = self.engine.add_request(  # logprobs are kept by the output thread
                body["prompt"], body["params"] or {}, body["prompt_token_ids"],
                body["request_id"], body["priority"] or 0, body["messages"], body["resume"],
                keep_logprobs=False, tokenized=body.get("tokenized"), tools=body.get("tools"),
                grammar=body.get("grammar"))
            request = self.engine.requests[request_id]
            self.outputs.open(request, (loop, queue_),
                              keep_logprobs=body["final_logprobs"] is not False,
                              echo=bool(body["echo"]))
            self.metrics.prompt_tokens.inc(len(request.prompt_token_ids))
            if request.finished:  # resumed with every choice ended (its final event was lost):
                self._finish(request, time.monotonic())  # no step will end it: answer now
            result = request_id
        except Exception as exc:  # typed errors keep their kind; never leave a caller waiting
            result = _error_event(exc, "admission")
        loop.call_soon_threadsafe(admitted.set_result, result)

    @control
    async def abort(self, request_id: str) -> None:
        self._unroute(request_id)
        self._commands.put(lambda: self._forget(request_id))

    @control
    def health(self) -> dict:
        """``status`` and ``reason``; ``incarnation`` (this actor instance: new after Ray
        restarts it); when failed, ``retry_in_s``: the seconds until the engine thread tries
        again (a new engine), when it has said so."""
        status, reason = self._status()
        state = {"status": status, "reason": reason, "incarnation": self.incarnation}
        retry = self._retry_in_s() if status == "failed" else None
        if retry is not None:
            state["retry_in_s"] = retry
        return state

    def _retry_in_s(self) -> float | None:
        """Seconds until the engine thread tries a new engine, where it has said when."""
        retry_at = self._retry_at
        return None if retry_at is None else round(max(0.0, retry_at - time.monotonic()), 1)

    @control
    def metrics_text(self) -> str:
        return self.metrics.text()

    @control
    def model_info(self) -> dict:
        return {"id": self.config.model.model, "created": int(self._started),
                "max_model_len": self.engine.max_model_len if self.engine else None}

    async def tokenize(self, request: dict) -> dict:
        """``POST /tokenize``'s ids, as admission makes a prompt's
        (:func:`cluster.engine.tokenization.tokenize`), or an error event."""
        return await self._in_tokenizer_pool("tokenize", request)

    async def detokenize(self, tokens: list) -> dict:
        """``POST /detokenize``'s text (:func:`cluster.engine.tokenization.detokenize`), or an
        error event."""
        return await self._in_tokenizer_pool("detokenize", tokens)

    async def _in_tokenizer_pool(self, name: str, arg) -> dict:
        """A :mod:`cluster.engine.tokenization` call, in the tokenizer pool (not a control
        call: a burst of them must not hold back health). Errors come back as an error event
        (:func:`cluster.contract.events.raise_if_error` raises it again)."""
        from cluster.engine import tokenization

        engine = self.engine  # once: the engine thread may replace it meanwhile
        try:
            if engine is None:
                raise self._not_serving()
            return await asyncio.get_running_loop().run_in_executor(
                self._tokenizers, getattr(tokenization, name), engine, arg)
        except Exception as exc:
            return _error_event(exc, name)

    @control
    def recovery(self) -> dict:
        """Timings of the last recovery (detect/placement/spawn/load/total seconds)."""
        return dict(self.engine.supervisor.last_recovery) if self.engine else {}

    @control
    def stats(self) -> dict:
        engine = self.engine
        if engine is None:
            return {"status": self.status, "open_requests": self._open}
        sched, bm = engine.scheduler, engine.block_manager
        return {"status": self.status, "open_requests": self._open,
                "streams": self.outputs.open_streams, "num_running": len(sched.running),
                "num_waiting": len(sched.waiting), "num_free_blocks": bm.num_free_blocks,
                "num_blocks": engine.num_blocks, "num_preemptions": sched.num_preemptions,
                "prefix_cache_hits": bm.prefix_cache_hits, "kv_usage": bm.usage,
                "kv_usage_peak": engine.kv_usage_peak,
                "device": engine.group.device, "backend": engine.group.backend,
                "dtype": engine.group.dtype, "threads": engine.group.threads, **engine.stats,
                **(engine.speculator.stats() if engine.speculator else {})}

    @control
    async def reset_for_benchmark(self) -> None:
        """Forget cached prompt prefixes and start a new ``stats()["kv_usage_peak"]``, on the
        engine thread between steps (``shardlm bench`` sends the same prompts again)."""
        if self.engine is None:
            return
        loop, done = asyncio.get_running_loop(), asyncio.Event()

        def reset() -> None:
            if self.engine is not None:
                self.engine.reset_measurement()
            loop.call_soon_threadsafe(done.set)

        self._commands.put(reset)
        await done.wait()

    @control
    async def worker_rss(self) -> dict:
        """Each worker's resident memory now (bytes), by actor name."""
        group = self.engine.group if self.engine else None
        if group is None:
            return {}
        pongs = await asyncio.gather(*[w.ping.remote() for w in group.workers])
        return {info.name: pong["rss"] for info, pong in zip(group.ranks, pongs)}

    @control
    async def poison(self, request_id: str) -> None:
        """Fault injection: the request's next token fails on the engine thread."""
        self._commands.put(lambda: self.engine and self.engine.poisoned.add(request_id))

    @control
    def pid(self) -> dict:
        """Where the engine actor runs (for ``shardlm chaos kill-engine``)."""
        return {"pid": os.getpid(), "node_id": ray.get_runtime_context().get_node_id()}

    @control
    def shutdown(self) -> None:
        if self.engine is not None:
            self.engine.shutdown()


def get_or_start_service(config: EngineConfig):
    """The engine actor named by the config's deployment, created (detached) if absent."""
    dep = config.deployment
    # a dead engine actor (its process or its node lost) is restarted by Ray, without end, and
    # starts a new engine; calls in flight fail (max_task_retries=0) and each caller's
    # RequestStream resumes its request on the new engine from what it already received
    # (deployment.resources: only on nodes that advertise them, e.g. not the head)
    actor = ray.remote(concurrency_groups={"control": CONTROL_CALLS})(EngineService).options(
        name=dep.name, namespace=dep.namespace, lifetime="detached", get_if_exists=True,
        num_cpus=0, resources=dict(dep.resources),
        max_concurrency=dep.max_open_requests + REFUSAL_SLOTS, max_restarts=-1, max_task_retries=0)
    return actor.remote(config.to_dict())


def replica_name(name: str, replica: int) -> str:
    """The engine service actor of replica ``replica`` of deployment ``name``."""
    return name if replica == 0 else f"{name}-{replica}"


def replica_config(config: EngineConfig, replica: int) -> EngineConfig:
    """Replica ``replica``'s config: its own actor name, and so its own worker names."""
    return config.with_overrides(name=replica_name(config.deployment.name, replica))


def get_or_start_services(config: EngineConfig) -> list:
    """One engine service per replica (``deployment.replicas``), created where absent."""
    return [get_or_start_service(replica_config(config, k))
            for k in range(config.deployment.replicas)]


def stop_services(name: str, namespace: str, replicas: int = 1) -> None:
    """Stop every engine service (replica) of deployment ``name``."""
    for replica in range(replicas):
        stop_service(replica_name(name, replica), namespace)


def stop_service(name: str = "shardlm", namespace: str = "shardlm") -> bool:
    try:
        actor = ray.get_actor(name, namespace=namespace)
    except ValueError:
        return False
    try:
        ray.get(actor.shutdown.remote(), timeout=60)
    finally:
        ray.kill(actor, no_restart=True)
    return True


class _Route:
    """Where a submitted request's events go: its subscriber's feed, tagged with its id (the
    output processor puts events here as into a request's own queue); its last event closes
    the route."""

    def __init__(self, service: EngineService, feed: asyncio.Queue, request_id: str,
                 subscriber: str):
        self.service, self.feed, self.request_id = service, feed, request_id
        self.subscriber = subscriber

    def put_nowait(self, event: dict) -> None:
        # aborted, its subscriber gone, or taken back (a new route under the same id)
        if self.service._routes.get(self.request_id) is not self:
            return
        last = event["type"] != "delta"
        self.feed.put_nowait([self.request_id, events.encode(event), last])
        if last:
            self.service._unroute(self.request_id)


def _error_event(exc: Exception, what: str) -> dict:
    """The error event of a call that failed (``what``: its name, for the log): a request's
    own fault (ValueError) or an unavailable engine as they are; anything else is also logged
    with its traceback."""
    if not isinstance(exc, (ValueError, EngineUnavailable)):
        log.exception("%s failed", what)
    return events.error_event(exc)


def _request_id_of(request: bytes) -> str | None:
    try:
        return msgpack.unpackb(request).get("request_id")
    except Exception:  # not even msgpack: no request to name
        return None
