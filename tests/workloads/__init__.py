"""Tiny real workloads that executor tests run under torchrun (`-m tests.workloads.<name>`)."""
