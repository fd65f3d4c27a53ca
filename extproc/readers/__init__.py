"""The read side: the reader registry and one module per client-facing protocol, each adapting
a log cursor to its wire format (the original endpoint, SSE, WebSocket, gRPC, the HTTP API)."""
