"""feste's benchmarks: feste against its peers and against the ideal, in one run.

``python -m benchmarks`` starts the local test server in its own process, runs every
workload of :mod:`benchmarks.workloads` with feste and with each peer (hand-written
asyncio, dask.delayed, a multiprocessing pool, LangChain), and writes
``benchmarks/results/latest.{json,md,png}``. See ``benchmarks/README.md``.
"""
