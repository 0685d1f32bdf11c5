"""The engine core: admission, scheduling over the paged KV cache, stepping the worker gang,
stop rules, recovery from failures, and the offline ``LLM`` API."""
