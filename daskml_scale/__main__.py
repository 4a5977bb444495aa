"""``python -m daskml_scale ...``: the same as the ``daskml-scale`` command."""

from __future__ import annotations

import sys

from daskml_scale.cli import main

if __name__ == "__main__":
    sys.exit(main())
