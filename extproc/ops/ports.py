"""Busy ports: `up` refuses a public or admin port that another process holds, before starting
anything, and names the port and its flag; Envoy's own bind error (a port taken between the
check and Envoy's bind) is read back into the same message.

The check binds the way Envoy's listeners do (SO_REUSEADDR on, SO_REUSEPORT off, since the
template sets `enable_reuse_port: false`): a port in TIME_WAIT only is free, a port with any
listener on it, SO_REUSEPORT or a wildcard address included, is busy.
"""

from __future__ import annotations

import errno
import ipaddress
import re
import socket
from dataclasses import dataclass

from extproc.errors import ConfigError

# Envoy's last log line when a listener or the admin cannot bind, e.g.
# "cannot bind '127.0.0.1:8080': Address already in use".
_ENVOY_BIND_ERROR = re.compile(r"cannot bind '\[?([^']*?)\]?:(\d+)': Address already in use")


class PortBusy(ConfigError):
    """A port `up` was told to use is held by another process; the message names its flag."""


@dataclass(frozen=True)
class WantedPort:
    flag: str  # the flag that chose it, e.g. "--port"
    host: str
    port: int  # 0: any free port, never busy

    def message(self) -> str:
        return f"port {self.port} ({self.flag}) is in use on {self.host}"


def _family(host: str) -> socket.AddressFamily:
    try:
        return socket.AF_INET6 if ipaddress.ip_address(host).version == 6 else socket.AF_INET
    except ValueError:
        return socket.AF_INET


def in_use(host: str, port: int) -> bool:
    """Whether a listener Envoy would make on host:port fails to bind right now."""
    with socket.socket(_family(host), socket.SOCK_STREAM) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind((host, port))
        except OSError as exc:
            if exc.errno == errno.EADDRINUSE:
                return True
            raise ConfigError(f"cannot bind {host}:{port}: {exc.strerror}") from None
    return False


def refuse_busy(wanted: list[WantedPort]) -> None:
    """Raise PortBusy for the first wanted port that another process holds."""
    for want in wanted:
        if want.port and in_use(want.host, want.port):
            raise PortBusy(want.message())


def busy_port_in_log(log_tail: str, wanted: list[WantedPort]) -> PortBusy | None:
    """Envoy's bind failure in its log, as the same error `refuse_busy` raises."""
    found = _ENVOY_BIND_ERROR.search(log_tail)
    if found is None:
        return None
    port = int(found.group(2))
    for want in wanted:
        if want.port == port:
            return PortBusy(want.message())
    return PortBusy(f"port {port} is in use on {found.group(1)}")
