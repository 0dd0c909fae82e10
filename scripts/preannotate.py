#!/usr/bin/env python3
"""Pre-annotate a whole Label Studio project on emloop's workers, without any timeout.

The same as `emloop-preannotate` once installed; `--help` for the options.
"""

from ml_backend.cli.preannotate import main

if __name__ == "__main__":
    raise SystemExit(main())
