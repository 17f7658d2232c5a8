"""Speculative decoding: drafters propose tokens, the target verifies them all in one forward."""

# Benchmarks only: verification accepts a fixed mean number of tokens per step (drafts accepted + 1), whatever the
# drafts are, so the machinery's speed can be measured with dummy weights. Outputs are then not the target's.
# Here, not in verify.py, so that the CLI can refuse it before importing torch.
SIMULATE_ACCEPT_ENV = "KEEL_SIMULATE_ACCEPT_LEN"
