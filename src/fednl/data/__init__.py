"""Federated tasks and Non-IID clients.

``build_task(cfg, tokenizer, seed) -> FederatedTask`` builds one of the tasks ``mmlu5``, ``niah7``, ``stream``,
``babilong``, ``jsonl`` (each config in its own file of :mod:`fednl.data.tasks`, registered there), re-deals it
with a partitioner (:mod:`fednl.data.partition`), reserves held-out clients and attaches a heterogeneity report
(:mod:`fednl.data.report`). See docs/DATA.md.
"""

from fednl.data.bins import bin_edges, bin_index, bin_means, relative_to_first
from fednl.data.build import TaskConfig, build_task, parse_task_config
from fednl.data.config import PartitionConfig, TaskConfigBase
from fednl.data.io import DataFileError, write_task_jsonl
from fednl.data.report import format_report, heterogeneity_report
from fednl.data.text import ContextTooShort
from fednl.data.tasks.babilong import BabilongConfig
from fednl.data.tasks.jsonl import JsonlConfig
from fednl.data.tasks.mmlu5 import Mmlu5Config
from fednl.data.tasks.niah7 import Niah7Config
from fednl.data.tasks.stream import StreamConfig
from fednl.data.types import ClientData, Example, FederatedTask, task_fingerprint

__all__ = [
    "BabilongConfig",
    "ClientData",
    "ContextTooShort",
    "DataFileError",
    "Example",
    "FederatedTask",
    "JsonlConfig",
    "Mmlu5Config",
    "Niah7Config",
    "PartitionConfig",
    "StreamConfig",
    "TaskConfig",
    "TaskConfigBase",
    "bin_edges",
    "bin_index",
    "bin_means",
    "build_task",
    "format_report",
    "heterogeneity_report",
    "parse_task_config",
    "relative_to_first",
    "task_fingerprint",
    "write_task_jsonl",
]
