"""Where the work runs.

Owns: the devices of a run, decided once (``devices``), the Ray session every stage of a
command shares (``session``), what Ray retried of its actors (``retries``), and what the console
shows of it all (``console``: the policy the CLI decides and the run's log file). Imports
``config`` and ``errors`` only.
"""
