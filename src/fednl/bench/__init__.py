"""Benchmarks behind ``fednl bench ...``: they print figures; speed and memory targets are checked here."""
