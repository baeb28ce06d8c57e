"""Generated gRPC modules of the ofa.v1 API (see proto/generate.py)."""
