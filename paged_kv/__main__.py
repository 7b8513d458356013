"""``python -m paged_kv``: the same command line as the ``paged-kv`` script."""

from paged_kv.cli import main

raise SystemExit(main())
