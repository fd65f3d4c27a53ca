"""The relay node process: its settings, its metrics, and the servers it runs."""
