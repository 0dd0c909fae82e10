#!/usr/bin/env python3
"""Order a Label Studio project's unlabeled tasks by an active-learning strategy.

The same as `emloop-prioritize` once installed; `--help` for the options.
"""

from ml_backend.cli.prioritize import main

if __name__ == "__main__":
    raise SystemExit(main())
