"""The workload: a storefront and a Q&A board to seed, and counter caches to rebuild.

Importing this package registers every workload job with dj.
"""

from . import counters, demo, schema, seed

__all__ = ["counters", "demo", "schema", "seed"]
