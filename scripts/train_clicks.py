#!/usr/bin/env python3
"""Train the click-to-mask network's default weights on synthetic EM sections.

The same as `emloop-train-clicks` once installed; `--help` for the options.
"""

from ml_backend.cli.train_clicks import main

if __name__ == "__main__":
    raise SystemExit(main())
