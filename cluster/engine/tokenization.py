"""Tokenizing for callers that want token ids, not text (the HTTP API's ``POST /tokenize``
and ``POST /detokenize``, vLLM's endpoints), through the very calls admission makes of a
request's prompt (:class:`cluster.engine.admission.Admission`): a prompt or a conversation
tokenized here gives the ids a completion or chat request with it is admitted with (at the
defaults). The engine service runs these in its tokenizer pool, off the engine thread.
"""

from __future__ import annotations


def tokenize(engine, request: dict) -> dict:
    """``request``: ``prompt`` (text) and ``add_special_tokens`` (default true), or
    ``messages`` (OpenAI's, as the chat route hands them to the engine), ``tools``,
    ``add_generation_prompt`` (default true), ``continue_final_message`` and
    ``add_special_tokens`` (both default false); ``return_token_strs``. Returns ``tokens``,
    ``token_strs`` (each token's string in the vocabulary, when asked for) and the engine's
    ``max_model_len``. A RequestError names the input at fault."""
    admission = engine.admission
    if request.get("messages") is not None:
        ids = admission.chat_token_ids(
            request["messages"], request.get("tools"),
            add_generation_prompt=request.get("add_generation_prompt", True),
            continue_final_message=request.get("continue_final_message", False),
            add_special_tokens=request.get("add_special_tokens", False))
    else:
        ids = admission.text_ids(request["prompt"], request.get("add_special_tokens", True))
    ids = list(ids)
    strs = admission.tokenizer.convert_ids_to_tokens(ids) if request.get("return_token_strs") \
        else None
    return {"tokens": ids, "token_strs": strs, "max_model_len": engine.max_model_len}


def detokenize(engine, tokens: list) -> dict:
    """``prompt``: the text of ``tokens`` (ids of the model's vocabulary, else a RequestError
    naming ``tokens``)."""
    return {"prompt": engine.admission.decode(tokens)}
