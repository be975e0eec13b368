"""Stage 2 of METHOD.md: samples to vectors.

Owns: the encoders (text, image) and the fusion of their vectors (``encoders``), and the
embedding stage that runs them in Ray Data actors over shards of the pool, resumable
(``stage``). The stage has one entry point, ``stage.embed_pool`` (the pool in, the stage's
directory written, its manifest returned), and ``stage.load_stage`` to read the vectors back.
Imports ``io``, ``runtime``, ``config`` and ``errors``.
"""
