"""Files in and out: pool formats, chat turns, the pool itself, the run directory, exports, and
where the packaged models' weights are.

Owns: ``formats`` (reading JSONL, JSON, CSV, Parquet, text, datasets), ``chat`` (turns of a
conversation), ``pool`` (the :class:`~ray_pipeline.io.pool.Pool` and reading it), ``run_dir``
(atomic writes, ``run.json``, stage keys), ``export`` (a candidate's records for a trainer),
``models`` (model names to local directories), ``media`` (recordings and clips decoded, streamed
and cut; their pre-flight checks). Imports ``config`` and ``errors`` only.
"""
