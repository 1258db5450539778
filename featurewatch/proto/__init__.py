"""The wire contract (activations.proto), its generated stubs and the codec.

Regenerate the stubs with `make proto`. May import: errors.
"""
