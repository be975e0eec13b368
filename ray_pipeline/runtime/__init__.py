"""Where the work runs.

Owns: the devices of a run, decided once (``devices``), and the Ray session every stage of a
command shares (``session``). Imports ``config`` and ``errors`` only.
"""
