"""Old import path of :mod:`fednl.experiment`, kept while the Flower modules (moving to ``fednl.flower``) still
import it from here."""

from fednl.experiment import build_simulator, clear_run_dir, format_results, holds_run, load_resolved, run_config

__all__ = ["build_simulator", "clear_run_dir", "format_results", "holds_run", "load_resolved", "run_config"]
