"""``python -m tools.docker ...``: the ``tidelog docker`` commands on their own."""

from tools.docker.commands import main

raise SystemExit(main())
