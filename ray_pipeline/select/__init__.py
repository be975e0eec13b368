"""Stages 3-7 of METHOD.md: vectors to candidate subsets.

Owns: k-means (``kmeans``: flat and multi-level, FAISS), the pure selection kernels
(``kernels``: center and key samples, budgets, k-center greedy; ``boundary``: the budget-aware
candidate), what the selection asks of the vectors (``strategy``: the ``Vectors`` and
``Clustering`` protocols), the selection routine and its in-memory engine (``engine``), the engine
over Ray tasks for pools whose vectors do not fit one process (``sharded``), and the stage's
tables (``tables``).
Imports ``io``, ``runtime``, ``config`` and ``errors``; never ``embed`` or ``finetune``.
"""
