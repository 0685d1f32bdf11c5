"""Engine outputs as plain event dicts (msgpack-able) for the service's callers."""

from __future__ import annotations

from cluster.engine.outputs import Delta, RequestOutput


def token_entry(tokenizer, token_id: int, logprob: float | None) -> dict:
    text = tokenizer.decode([token_id]) if tokenizer is not None else ""
    return {"token_id": token_id, "token": text, "bytes": list(text.encode("utf-8")),
            "logprob": logprob}


def logprob_entries(tokenizer, token_ids: list[int], steps: list[dict[int, float]], top_n: int) -> list[dict]:
    """One entry per generated token: the chosen token's logprob and the top ``top_n``."""
    out = []
    for token_id, step in zip(token_ids, steps):
        best = sorted(step.items(), key=lambda kv: -kv[1])[:top_n]
        entry = token_entry(tokenizer, token_id, step[token_id])
        entry["top"] = [token_entry(tokenizer, t, lp) for t, lp in best]
        out.append(entry)
    return out


def prompt_entries(tokenizer, prompt_ids: list[int], steps: list[dict[int, float] | None],
                   top_n: int) -> list[dict]:
    """One entry per prompt token; the first has no logprob (nothing comes before it), as
    ``logprob`` and ``top`` None."""
    first = token_entry(tokenizer, prompt_ids[0], None) | {"top": None}
    scored = [step if step is not None else {t: float("nan")}
              for t, step in zip(prompt_ids[1:], steps[1:])]
    return [first] + logprob_entries(tokenizer, prompt_ids[1:], scored, top_n)


def delta_event(delta: Delta, tokenizer, top_n: int | None) -> dict:
    """``top_n``: the request's ``logprobs`` parameter (None: no logprobs asked for)."""
    logprobs = None
    if delta.logprobs is not None:
        logprobs = logprob_entries(tokenizer, delta.token_ids, delta.logprobs, top_n or 0)
    return {"type": "delta", "index": delta.index, "text": delta.text, "token_ids": delta.token_ids,
            "finish_reason": delta.finish_reason, "logprobs": logprobs}


def final_event(output: RequestOutput, tokenizer, top_n: int | None) -> dict:
    outputs = []
    for o in output.outputs:
        logprobs = None
        if o.logprobs is not None:
            logprobs = logprob_entries(tokenizer, o.token_ids, o.logprobs, top_n or 0)
        outputs.append({"index": o.index, "text": o.text, "token_ids": o.token_ids,
                        "finish_reason": o.finish_reason, "stop_reason": o.stop_reason,
                        "logprobs": logprobs, "error": o.error})
    return {"type": "final", "request_id": output.request_id,
            "prompt_tokens": len(output.prompt_token_ids),
            "completion_tokens": sum(len(o.token_ids) for o in output.outputs),
            "cached_tokens": output.num_cached_tokens, "outputs": outputs}
