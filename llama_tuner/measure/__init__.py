"""The measuring layer: configurations, results, the child process that runs llama.cpp, its launcher,
memory sampling, GPU probes, the machine's environment and bandwidth, llama-bench-style sweeps."""
