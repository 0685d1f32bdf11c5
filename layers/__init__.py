"""Tensor-parallel building blocks and the models built from them. Imports nothing of
``cluster`` or ``workers``; the platform's ops are chosen once per worker (``layers.platform``)."""
