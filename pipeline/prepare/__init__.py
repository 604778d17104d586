"""Dataset specs: readers that stream ``Record``s (``readers``, one registry of
sources), the prepare stage (``prepare``) and reading a prepared folder back
(``source.iter_records``).

Submodules are imported where used, so a stage pulls in only what it runs.
"""
