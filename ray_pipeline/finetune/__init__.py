"""Stages 8-10 of METHOD.md: prove the candidates by fine-tuning, choose, report, use.

Owns: the task strategy (``task``: classification, causal LM), the held-out split (``heldout``),
the cheap proxies that prune candidates (``proxy``), the scores (``metrics``), the per-worker
training function and its two engines (``train``: the hand-written loop, ``hf_trainer``: HF
``Trainer``; ``trial``: what they share), inference and test scoring (``infer``), the Tune sweep
(``sweep``), its records and choice (``outcome``) and what it shows on the console
(``progress``), and the verdict (``verdict``). May import ``select`` (its kernels), ``io``,
``runtime``, ``config``, ``errors``; never ``embed`` or the pipeline.
"""
