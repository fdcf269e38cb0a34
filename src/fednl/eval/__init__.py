"""Evaluation of finished runs: the protocol of ``fednl evaluate`` (views, aggregation drop, NIAH by depth, CE by
position), the memory views of ``fednl memory-eval`` and ``fednl score``. A client's own metrics and the scoring
function are in :mod:`fednl.client.metrics` and :mod:`fednl.client.scoring`."""
