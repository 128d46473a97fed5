"""Evaluation of frozen features: k-NN and linear probes, feature caching, model registry."""
