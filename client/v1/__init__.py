"""Generated gRPC modules of the ofa.v1 API (see proto/generate.py)."""

API_VERSION = "1.6"  # from the .proto files: the server reports it, the client checks it
