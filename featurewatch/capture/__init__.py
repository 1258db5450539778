"""Pure torch/transformers capture: layer hooks, samplers, model loading, the sender.

Never imports ray: replicas are Ray processes, but this code must run anywhere.
"""
