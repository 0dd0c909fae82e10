#!/usr/bin/env python3
"""Write a project's brush annotations back into a 3-D label volume of the original shape.

The same as `emloop-export-volume` once installed; `--help` for the options.
"""

from ml_backend.cli.export_volume import main

if __name__ == "__main__":
    raise SystemExit(main())
