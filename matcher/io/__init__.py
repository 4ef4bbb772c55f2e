"""Storage and the lake: where every file the project reads or writes lives, and how it is read and committed.

`lake.py` alone spells the lake's layout. I/O modules may use the steps, never `jobs/` or the app.
"""
