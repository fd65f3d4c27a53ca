"""relay.* protobuf packages (generated code lives below)."""
