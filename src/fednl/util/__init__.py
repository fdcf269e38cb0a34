"""Small dependency-free helpers shared by every layer: atomic file writes (:mod:`fednl.util.atomic`) and the
name registries that components fill from their own files (:mod:`fednl.util.registry`).

Nothing here imports another ``fednl`` package, so any module may use it without an import cycle.
"""
