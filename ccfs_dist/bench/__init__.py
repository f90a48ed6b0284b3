"""What the benchmark scripts (launch/bench*.py) share: the clock and paired timing windows, peak memory,
child processes and free ports, generated pools, and the benchmarks' seeds. The engine never imports it."""
