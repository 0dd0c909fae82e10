#!/usr/bin/env python3
"""Simulate active learning on a labelled EM volume, the ground truth acting as the oracle.

The same as `emloop-simulate` once installed; `--help` for the options.
"""

from ml_backend.cli.simulate import main

if __name__ == "__main__":
    raise SystemExit(main())
