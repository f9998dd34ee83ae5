"""``python -m benchmarks`` (from a source checkout) or ``python -m resfuse.benchmarks``."""

from .cli import main

main()
