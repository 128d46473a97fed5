"""Fault injection for tests: real servers disturbed from outside, never our code mocked."""
