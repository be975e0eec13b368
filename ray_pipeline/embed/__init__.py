"""Stage 2 of METHOD.md: samples to vectors.

Owns: the encoders (text, image), the fusion of their vectors, and the embedding stage that
runs them in Ray Data actors over shards of the pool, resumable (``stage``). Imports ``io``,
``runtime``, ``config`` and ``errors``.
"""
