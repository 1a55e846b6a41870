"""python -m bench.loadtest: see bench/loadtest/cli.py or --help."""

from bench.loadtest.cli import main

raise SystemExit(main())
