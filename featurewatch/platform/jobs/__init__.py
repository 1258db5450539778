"""Batch jobs: gathering activations, SAE training (Ray Train), evaluation and refresh,
LoRA fine-tunes.

May import: actors/, analysis/, capture/, sae/, proto/, storage/, config, errors.
"""
