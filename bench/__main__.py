"""
``python -m bench``: run the benchmarks and print the report.
"""

from bench.run import main

raise SystemExit(main())
