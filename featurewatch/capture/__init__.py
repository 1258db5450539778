"""Pure torch/transformers capture: layer hooks, samplers, steering hooks, model
loading, packing and the sender.

May import: proto/, errors. Never ray: replicas are Ray processes, but this code must run
anywhere.
"""
