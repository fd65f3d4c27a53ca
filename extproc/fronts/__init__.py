"""Client-facing fronts of the relay node: each adapts a log cursor to one wire protocol."""
