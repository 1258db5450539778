"""Long-lived processes: the Serve model server, the gRPC collector, the SAE encoder."""
