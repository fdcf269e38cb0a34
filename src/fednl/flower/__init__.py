"""fednl on Flower: every strategy through fednl's one round loop, with its clients on Flower SuperNodes.

* :mod:`fednl.flower.protocol` — the messages and a SuperNode's node config;
* :mod:`fednl.flower.codec` — payloads <-> Flower records, bit-exact, with exact byte accounting;
* :mod:`fednl.flower.data` — a node's own data (a client folder; in simulation, its partition of the task);
* :mod:`fednl.flower.node` — the ClientApp handlers and the node's client state on its own disk;
* :mod:`fednl.flower.server` — the ServerApp: node discovery and :class:`~fednl.flower.server.FlowerExecutor`;
* :mod:`fednl.flower.launch` — settings, the Ray simulation, an in-process Grid;
* :mod:`fednl.flower.app` — the ``serverapp`` / ``clientapp`` objects ``flwr run`` loads.

See docs/FLOWER.md (recipes, what crosses the wire, the threat model).
"""
