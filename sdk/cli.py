"""How every emloop script ends: a one-line message and an exit status, never a traceback.

0 done, 1 a runtime failure (Label Studio, Redis, a worker, the disk), 2 bad input,
130 interrupted. ``EMLOOP_TRACEBACK=1`` re-raises for debugging.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable
from pathlib import Path

from sdk.labelstudio import label_studio_error_message


def prog_name(script: str) -> str:
    """The name the user typed: the console entry point (`emloop-...`), else the script's name."""
    typed = Path(sys.argv[0]).name if sys.argv and sys.argv[0] else ""
    return typed if typed.startswith("emloop-") else script


def run_main(
    prog: str,
    action: Callable[[], str | None],
    *,
    input_errors: tuple[type[BaseException], ...],
    failures: tuple[type[BaseException], ...] = (),
    interrupted: str = "interrupted",
    url: str | None = None,
) -> int:
    """Run `action`; print its summary (if any) or its failure as one line on stderr.

    `failures` are runtime failures whose message already says what failed (printed as it is);
    any other exception is printed with its type.
    """
    try:
        summary = action()
    except input_errors as exc:
        print(f"{prog}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"{prog}: {interrupted}", file=sys.stderr)
        return 130
    except failures as exc:
        print(f"{prog}: error: {exc}", file=sys.stderr)
        return 1
    except Exception as exc:
        if os.environ.get("EMLOOP_TRACEBACK"):
            raise
        message = (label_studio_error_message(exc, url) if url else None) or f"{type(exc).__name__}: {exc}"
        print(f"{prog}: error: {message}", file=sys.stderr)
        return 1
    if summary:
        print(f"{prog}: {summary}", file=sys.stderr)
    return 0
