"""stream-relay: the relay node that runs as Envoy's external processor.

Envoy terminates client protocols and routes to the LLM upstream; this package frames the
streamed responses into events, tags them with resumable ids and keeps the replay log.
"""

__version__ = "0.1.0"
