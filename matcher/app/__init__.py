"""The user-facing application: the `matcher` command, the demo, search over published tables, demo catalogs.

The app sits on top: it may run jobs; nothing below imports it.
"""
