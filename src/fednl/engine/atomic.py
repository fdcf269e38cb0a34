"""Old import path of :mod:`fednl.util.atomic`, kept while the Flower modules still import it from here."""

from fednl.util.atomic import atomic_open, atomic_write_bytes, atomic_write_json, atomic_write_text, sha256_file

__all__ = ["atomic_open", "atomic_write_bytes", "atomic_write_json", "atomic_write_text", "sha256_file"]
