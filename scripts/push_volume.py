#!/usr/bin/env python3
"""Cut a 3-D volume into 2-D patches and create a Label Studio task per patch.

The same as `emloop-push-volume` once installed; `--help` for the options.
"""

from ml_backend.cli.push_volume import main

if __name__ == "__main__":
    raise SystemExit(main())
