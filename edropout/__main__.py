"""``python -m edropout``: see :mod:`edropout.cli`."""

from .cli import main

raise SystemExit(main())
