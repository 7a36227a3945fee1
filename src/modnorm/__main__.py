"""``python -m modnorm``: the ``modnorm`` command, where its script is not on the PATH."""

from modnorm.cli import main

raise SystemExit(main())
