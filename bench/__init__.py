"""ORFEAS benchmarks and load test: `make bench`, `make loadtest`."""
