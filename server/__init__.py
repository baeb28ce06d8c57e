"""The gRPC service behind ``ofa serve`` (installed as ``ofa_server``)."""
