"""Engines that run federated rounds: the in-process simulator, the wire (dtype casts), the byte ledger and
the run state (checkpoint / resume).

Import the sub-modules directly (``fednl.engine.simulator``, ``fednl.engine.ledger``, ...); this package
imports nothing itself.
"""
