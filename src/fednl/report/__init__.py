"""The self-contained HTML report comparing runs (``fednl report``)."""

from fednl.report.html import build_report, read_bench, write_report
from fednl.report.load import RunRecord, load_run_dir, read_metrics
from fednl.report.rows import results_rows

__all__ = ["RunRecord", "build_report", "load_run_dir", "read_bench", "read_metrics", "results_rows",
           "write_report"]
