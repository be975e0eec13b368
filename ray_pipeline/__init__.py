"""ray_pipeline: choose a small, diverse core of a fine-tuning pool, and prove it by fine-tuning.

Stages, one module each: ``data`` (read the pool), ``embed`` (vectors), ``cluster`` (FAISS
k-means), ``select`` (key samples, budgets, k-center greedy), ``pipeline`` (the job that runs
them and writes the run directory), ``cli`` (the ``ray-pipeline`` command).
"""

__version__ = "0.1.0"
