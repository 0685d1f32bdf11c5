"""Operator tools: ``shardlm batch`` (resumable JSONL jobs) and ``shardlm chaos`` (fault
injection)."""
