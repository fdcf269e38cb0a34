"""docs/FLOWER.md §7: Flower's SecAgg+ workflow runs only under the legacy context, so it cannot run inside
fednl's Message-API ServerApp. Fails (and asks for the section to be revisited) when a Flower release lifts that."""

from __future__ import annotations

import pytest

pytest.importorskip("flwr")


def test_secaggplus_workflow_needs_the_legacy_context() -> None:
    from flwr.app import Context, RecordDict
    from flwr.server.workflow import SecAggPlusWorkflow

    ctx = Context(run_id=1, node_id=0, node_config={}, state=RecordDict(), run_config={})
    with pytest.raises(TypeError, match="LegacyContext"):
        SecAggPlusWorkflow(num_shares=4, reconstruction_threshold=3)(None, ctx)


def test_message_api_strategies_have_no_secure_aggregation() -> None:
    import flwr.serverapp.strategy as strategies

    assert not [n for n in dir(strategies) if "secagg" in n.lower() or "secure" in n.lower()]
