"""The actor side: one worker actor per device, its model runner, KV cache, shard loader, host
memory, and the communicators (``comm``). Of the driver side it imports only
``cluster.contract``."""
