"""Code shared by Trellis processes: the generated gRPC stubs (v1), sampling-parameter validation,
the engine-facing worker service, server plumbing (health, reflection, drain) and logging."""
