"""``python -m daskml_scale.serving BUNDLE_URL [--port 8000] ...``: run the server.

The same command as ``daskml-scale serve`` (same options, same exit codes): this
entry exists so that a server can be started with nothing but the package.
"""

from __future__ import annotations

import sys
from typing import Sequence

from daskml_scale import cli


def main(argv: Sequence[str] | None = None) -> int:
    """Run ``daskml-scale serve`` with these arguments; returns the exit code."""
    return cli.main(["serve", *(sys.argv[1:] if argv is None else argv)])


if __name__ == "__main__":
    sys.exit(main())
