"""``python -m edropout``: see :mod:`edropout.experiments.cli`."""

from .experiments.cli import main

raise SystemExit(main())
