"""
Benchmarks, soak and fault matrix for the sidecar.

``python -m bench`` runs them all on loopback and prints a report; see
``docs/benchmarks.md`` for what each part measures and the last results.
"""
