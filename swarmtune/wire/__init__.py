"""Generated protobuf and gRPC code (do not edit: run proto/generate.sh)."""
