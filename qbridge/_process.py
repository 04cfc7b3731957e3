"""One process of :func:`qbridge.check_multiprocess_load`: ``python -m qbridge._process SPEC``."""

import json
import sys

from qbridge._multiprocess import run_process

if __name__ == "__main__":
    run_process(json.loads(sys.argv[1]))
