"""featurewatch: SAE features over a model fleet's sampled activations, with drift SQL.

The data path, one module per step:

    capture/     hooks + samplers on a transformers causal LM; the replica-side sender
    proto/       the gRPC wire contract and its codec/validation
    actors/      Ray Serve model server, the gRPC collector actor, the SAE encoder worker
    storage/     spool (durable segments), lake (Parquet), catalog (DuckDB), drift SQL
    sae/         SAE model, SAELens-format files, training step, metrics (pure torch)
    platform/    config, Ray Data pipeline, Ray Train job, the demo, the CLI
"""

__version__ = "0.1.0"
