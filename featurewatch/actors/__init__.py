"""Every long-lived Ray service with the code that starts it: the gRPC collector
(collector.py), the Serve model server (model_server.py) and its deployment and steering
(serving.py), the SAE encoder (sae_encoder.py) and the encode pipeline (pipeline.py), the
Ray metrics (metrics.py) and the runtime helpers that start Ray and the collectors
(runtime.py).

May import: analysis/, capture/, sae/, proto/, storage/, config, errors. Never platform/.
"""
