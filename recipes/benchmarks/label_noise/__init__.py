"""The label-noise benchmark (`recipes/benchmarks/bench_label_noise.py` is its command line)."""
