"""Speculative decoding: drafters propose tokens, the target verifies them all in one forward."""
