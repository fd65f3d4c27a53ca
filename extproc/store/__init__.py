"""Where session logs live. `memory` is the embedded default; others share the interface."""

from extproc.store.memory import MemoryStore, StoreLimits

__all__ = ["MemoryStore", "StoreLimits"]
