"""Developer tooling: GPU benchmarks, profiling, capacity sums, soak runs and the full-size random
pipeline builder, with the JSON they write. Never imported by the `qie` library."""
