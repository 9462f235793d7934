"""The built-in GLM-4.6 simulator: `codeplan simulate`, tests, benchmarks, and `make run`
when no upstream is configured."""
