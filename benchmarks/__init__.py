"""Benchmark scripts: optimizer overhead, GPT on Shakespeare, learning-rate transfer."""
