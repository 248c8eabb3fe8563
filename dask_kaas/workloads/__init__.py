"""Graph builders shared by the demo, the benchmark, the examples and tests."""
