#!/usr/bin/env python3
"""Segment a whole volume with an emloop checkpoint, slice by slice, into Zarr (default) or TIFF.

The same as `emloop-segment-volume` once installed; `--help` for the options.
"""

from ml_backend.cli.segment_volume import main

if __name__ == "__main__":
    raise SystemExit(main())
