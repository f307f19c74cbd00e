"""A served guest's status: the device's snapshot plus what the host side
knows (connection, protocol counters, memory).  Frozen; the control socket
sends ``to_dict()`` and the status view reads it back with ``from_dict``."""

from dataclasses import dataclass, field
from types import MappingProxyType

from ..status import DeviceStatus, asdict_shallow


@dataclass(frozen=True)
class GuestStatus:
    name: str = "?"
    device: DeviceStatus = field(default_factory=DeviceStatus)
    socket: str = None
    connected: bool = False
    sessions: int = 0
    protocol: MappingProxyType = field(default_factory=lambda: MappingProxyType({}))
    protocol_errors: int = 0
    internal_errors: int = 0
    memory_bytes: int = 0
    ram_backed_bytes: int = None
    frontend_pid: int = None         # QEMU's pid (SO_PEERCRED of the connection)
    rings: tuple = None              # ring diagnostics (ctl status only)
    # the serving process: pid, restarts (by its supervisor), restored (this session
    # came back from the fd store), fd_store (sessions are kept there), checkpoints
    process: MappingProxyType = field(default_factory=lambda: MappingProxyType({}))

    @property
    def serving(self):
        return self.connected and self.device.driver_ok

    def to_dict(self):
        d = self.device.to_dict()
        for k, v in asdict_shallow(self).items():
            if k == "device":
                continue
            if isinstance(v, MappingProxyType):
                v = dict(v)
            elif k == "rings":
                if v is None:
                    continue
                v = [dict(r) for r in v]
            d[k] = v
        return d

    @classmethod
    def from_dict(cls, d):
        kw = {f: d[f] for f in cls.__dataclass_fields__ if f in d and f != "device"}
        for k in ("protocol", "process"):
            if k in kw:
                kw[k] = MappingProxyType(dict(kw[k]))
        if kw.get("rings") is not None:
            kw["rings"] = tuple(MappingProxyType(dict(r)) for r in kw["rings"])
        return cls(device=DeviceStatus.from_dict(d), **kw)
