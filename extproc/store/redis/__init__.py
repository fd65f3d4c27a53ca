"""The Redis (or Valkey) Streams store, shared by several relay nodes."""
