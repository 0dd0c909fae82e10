"""Development tooling, not installed with the package: the process launchers behind `make demo`,
the tests and the end-to-end benchmarks (Label Studio, Redis, the backend and RQ workers)."""
