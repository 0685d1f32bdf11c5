"""Conversations rendered into prompt text: the chat template, with tools.

A conversation is OpenAI's list of messages: ``{"role", "content"}``, an assistant message
may carry ``tool_calls`` (its content then may be null) and a ``tool`` message answers one
(``tool_call_id``). ``tools`` are OpenAI's function definitions.

A template that knows tools (it reads ``tools``) gets them, and the messages as they are, as
transformers' ``apply_chat_template`` passes them. A template that does not (SmolLM2's, and
every plain ChatML template) would drop them silently, so the model would never hear of its
tools; for those the conversation is rewritten in the Hermes convention, which the output
parser reads back (``cluster.serving.http.tools``): the tools are listed in the system
message inside ``<tools></tools>`` with how to call one (a ``<tool_call>`` element holding
``{"name": ..., "arguments": {...}}``), an assistant's earlier calls become such elements in its
content, and a tool's answer becomes a user turn inside ``<tool_response></tool_response>``.
"""

from __future__ import annotations

import json

from cluster.contract.errors import RequestError

TOOL_CALL_OPEN, TOOL_CALL_CLOSE = "<tool_call>", "</tool_call>"
ROLES = ("system", "developer", "user", "assistant", "tool")


def render(tokenizer, messages: list, tools: list | None = None,
           add_generation_prompt: bool = True, continue_final_message: bool = False) -> str:
    """The prompt text of a conversation, ending where the assistant's answer begins (or,
    with ``continue_final_message``, inside the last message, which the model continues;
    without ``add_generation_prompt``, after the last message)."""
    check_messages(messages)
    if tools is not None:
        check_tools(tools)
    template = _template_text(tokenizer)
    options = {"add_generation_prompt": add_generation_prompt}
    if continue_final_message:
        options["continue_final_message"] = True
    if tools and "tools" in template:
        return _apply(tokenizer, messages, tools=tools, **options)
    if tools or any(m.get("tool_calls") or m["role"] == "tool" for m in messages):
        if "tool_calls" not in template:
            messages = hermes_messages(messages, tools or [])
    return _apply(tokenizer, messages, **options)


def _apply(tokenizer, messages: list, **options) -> str:
    try:
        return tokenizer.apply_chat_template(messages, tokenize=False, **options)
    except ValueError as exc:  # transformers: the last message cannot be continued
        if not options.get("continue_final_message"):
            raise
        reason = (str(exc).splitlines() or ["?"])[0][:200]
        raise RequestError(f"continue_final_message: the last message cannot be continued "
                           f"({reason})", "continue_final_message") from None


def _template_text(tokenizer) -> str:
    t = getattr(tokenizer, "chat_template", None)
    if isinstance(t, dict):
        t = t.get("default") or next(iter(t.values()), "")
    return t or ""


def check_messages(messages: object) -> None:
    """A RequestError naming what is wrong with a conversation."""
    if not isinstance(messages, list) or not messages:
        raise RequestError("messages must be a non-empty list of {role, content} objects",
                           "messages")
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or m.get("role") not in ROLES:
            raise RequestError(f"messages[{i}] must be an object with a role among "
                               f"{', '.join(ROLES)}", "messages")
        content = m.get("content")
        calls = m.get("tool_calls")
        if content is None and not (m["role"] == "assistant" and calls):
            raise RequestError(f"messages[{i}] ({m['role']}) has no content", "messages")
        if content is not None and not isinstance(content, str):
            raise RequestError(f"messages[{i}].content must be a string", "messages")
        if calls is not None and (m["role"] != "assistant" or not isinstance(calls, list)):
            raise RequestError(f"messages[{i}]: only an assistant message carries a list of "
                               "tool_calls", "messages")


def check_tools(tools: object) -> None:
    if not isinstance(tools, list) or not all(
            isinstance(t, dict) and isinstance(t.get("function"), dict)
            and isinstance(t["function"].get("name"), str) for t in tools):
        raise RequestError("tools must be a list of {type: function, function: {name, "
                           "parameters}} objects", "tools")


def hermes_messages(messages: list, tools: list) -> list[dict]:
    """The conversation for a template without tools: tools described in the system message,
    earlier calls and answers as text (see the module's docstring)."""
    out = [_hermes_message(m) for m in messages]
    if tools:
        text = tools_prompt(tools)
        if out[0]["role"] == "system":
            out[0] = {"role": "system", "content": out[0]["content"] + "\n\n" + text}
        else:
            out.insert(0, {"role": "system", "content": text})
    return out


def _hermes_message(m: dict) -> dict:
    role = "system" if m["role"] == "developer" else m["role"]
    if role == "tool":
        return {"role": "user", "content": f"<tool_response>\n{m['content']}\n</tool_response>"}
    content = m.get("content") or ""
    for call in m.get("tool_calls") or []:
        function = call.get("function", {}) if isinstance(call, dict) else {}
        arguments = function.get("arguments", "{}")
        try:
            arguments = json.loads(arguments) if isinstance(arguments, str) else arguments
        except ValueError:
            pass
        body = json.dumps({"name": function.get("name"), "arguments": arguments},
                          ensure_ascii=False)
        content += ("\n" if content else "") + f"{TOOL_CALL_OPEN}\n{body}\n{TOOL_CALL_CLOSE}"
    return {"role": role, "content": content}


def tools_prompt(tools: list) -> str:
    """The tools and how to call them, in the Hermes convention's words."""
    listed = "\n".join(json.dumps(t, ensure_ascii=False) for t in tools)
    return ("You can call functions to help with the user's request. The functions you can "
            f"call are listed inside <tools></tools>:\n<tools>\n{listed}\n</tools>\n\n"
            "To call one, answer with a JSON object holding the function's name and its "
            f"arguments inside {TOOL_CALL_OPEN}{TOOL_CALL_CLOSE}, like this:\n"
            f'{TOOL_CALL_OPEN}\n{{"name": "<function name>", "arguments": {{...}}}}\n'
            f"{TOOL_CALL_CLOSE}")
