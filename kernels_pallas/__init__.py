"""Pallas kernels: arrays and block sizes only, no model or config knowledge.

Every kernel takes `interpret=` so CPU tests can run it.
"""
