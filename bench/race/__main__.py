"""``python -m bench.race``: see ``bench/race/__init__.py``."""
import sys

from .cli import main

main()
sys.exit(0)
