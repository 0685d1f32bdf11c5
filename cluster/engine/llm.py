"""The offline API, in the style users know from vLLM.

    from cluster import LLM, SamplingParams
    llm = LLM(model="smollm2-135m-instruct", tensor_parallel_size=2)
    outputs = llm.generate(["Hello"], SamplingParams(max_tokens=32, temperature=0))
"""

from __future__ import annotations

from pathlib import Path

from cluster.contract.config import EngineConfig
from cluster.contract.errors import RequestError
from cluster.engine.engine import Engine
from cluster.engine.outputs import RequestOutput
from cluster.contract.sampling import SamplingParams


class LLM:
    def __init__(self, model: str | None = None, tensor_parallel_size: int | None = None,
                 pipeline_parallel_size: int | None = None,
                 config: str | Path | EngineConfig | None = None, **overrides):
        """``config``: an EngineConfig or a YAML path (default: the built-in defaults);
        ``model``, the parallel sizes and ``overrides`` (any config field by name) win over it."""
        base = config if isinstance(config, EngineConfig) else (
            EngineConfig.from_yaml(config) if config else EngineConfig())
        named = {"model": model, "tensor_parallel_size": tensor_parallel_size,
                 "pipeline_parallel_size": pipeline_parallel_size}
        overrides.update({k: v for k, v in named.items() if v is not None})
        self.config = base.with_overrides(**overrides)
        self.engine = Engine(self.config)
        self.tokenizer = self.engine.tokenizer

    def generate(self, prompts: str | list[str] | None = None,
                 sampling_params: SamplingParams | list[SamplingParams] | None = None,
                 prompt_token_ids: list[int] | list[list[int]] | None = None,
                 priority: list[int] | None = None) -> list[RequestOutput]:
        """One output per prompt, in order. All prompts are checked before any runs."""
        inputs = _inputs(prompts, prompt_token_ids)
        params = _per_prompt(sampling_params or SamplingParams(), len(inputs), "sampling_params")
        priorities = _per_prompt(priority or 0, len(inputs), "priority")
        ids = []
        try:
            for i, ((text, tokens), p, prio) in enumerate(zip(inputs, params, priorities)):
                ids.append(self._add(i, text, tokens, p, prio))
            while self.engine.has_unfinished():
                self.engine.step()
        finally:
            for request_id in ids:  # a failure part-way leaves nothing queued behind
                if not self.engine.requests[request_id].finished:
                    self.engine.abort(request_id)
        return [self.engine.pop_finished(r) for r in ids]

    def _add(self, index: int, text, tokens, params, priority) -> str:
        try:
            return self.engine.add_request(text, params, tokens, priority=priority)
        except RequestError as exc:
            raise exc.prefixed(f"prompt {index}: ") from exc

    def chat(self, messages: list[dict] | list[list[dict]],
             sampling_params: SamplingParams | None = None,
             tools: list[dict] | None = None) -> list[RequestOutput]:
        """Generate replies to one conversation or a list of them, with the chat template
        (and the ``tools`` they may call, OpenAI's function definitions)."""
        conversations = messages if messages and isinstance(messages[0], list) else [messages]
        token_ids = [self.chat_token_ids(c, tools) for c in conversations]
        return self.generate(prompt_token_ids=token_ids, sampling_params=sampling_params)

    def chat_token_ids(self, messages: list[dict], tools: list[dict] | None = None) -> list[int]:
        """A conversation rendered with the tokenizer's chat template, as token ids."""
        return self.engine.chat_token_ids(messages, tools)

    def shutdown(self) -> None:
        self.engine.shutdown()

    def __enter__(self) -> "LLM":
        return self

    def __exit__(self, *exc) -> None:
        self.shutdown()


def _inputs(prompts, prompt_token_ids) -> list[tuple[str | None, list[int] | None]]:
    if (prompts is None) == (prompt_token_ids is None):
        raise RequestError("give prompts or prompt_token_ids (exactly one)", "prompts")
    if prompts is not None:
        prompts = [prompts] if isinstance(prompts, str) else list(prompts)
        return [(p, None) for p in prompts]
    if prompt_token_ids and all(isinstance(t, int) for t in prompt_token_ids):
        prompt_token_ids = [prompt_token_ids]
    return [(None, list(t)) for t in prompt_token_ids]


def _per_prompt(value, count: int, name: str) -> list:
    if isinstance(value, list):
        if len(value) != count:
            raise RequestError(f"{name} has {len(value)} entries for {count} prompts", name)
        return value
    return [value] * count
