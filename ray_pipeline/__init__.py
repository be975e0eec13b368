"""ray_pipeline: choose a small, diverse core of a fine-tuning pool, and prove it by fine-tuning.

The folders are the stages, each importing only the ones below it: ``config`` (the one typed
config), ``io`` (pool, formats, run directory, export), ``runtime`` (devices, the Ray session),
``embed`` (vectors), ``select`` (k-means, kernels, engines), ``finetune`` (task, held-out split,
proxy, training, sweep, verdict), then ``report``, ``pipeline`` (the stages of a run directory)
and ``cli`` (the ``ray-pipeline`` command).
"""

__version__ = "0.1.0"
