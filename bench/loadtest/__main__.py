"""python -m gptoss_serve.bench.loadtest: see bench/loadtest/cli.py or --help."""

from gptoss_serve.bench.loadtest.cli import main

raise SystemExit(main())
