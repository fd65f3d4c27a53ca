"""relay.v1: generated from proto/relay/v1/relay.proto; see extproc/proto/__init__.py."""
