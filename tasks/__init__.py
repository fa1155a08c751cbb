"""The workload: a storefront and a Q&A board to seed, counter caches to rebuild, and work-it's mail job.

Importing this package registers every workload job with dj.
"""

from . import counters, demo, mail, seed

__all__ = ["counters", "demo", "mail", "seed"]
