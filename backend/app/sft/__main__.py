"""`python -m app.sft ...`: the same as the `sft` command."""

from app.sft.cli import main

raise SystemExit(main())
