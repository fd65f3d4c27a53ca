"""The session model, free of I/O: ids, sans-IO framing, the session log and its cursors,
usage parsing, and the writer that turns upstream bytes into logged events."""
