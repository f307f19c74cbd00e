"""The device's status: one frozen snapshot that the host side reads
(policy, metrics, control socket, status view) instead of string keys."""

from dataclasses import dataclass, field
from types import MappingProxyType

from .features import PFN_SHIFT


def _frozen(d):
    return MappingProxyType(dict(d or {}))


@dataclass(frozen=True)
class DeviceStatus:
    features_offered: tuple = ()
    features_acked: tuple = ()
    queues: tuple = ()               # role of each queue, compact numbering
    target_pages: int = 0
    actual_pages: int = 0
    poison_val: int = 0
    discard_mode: str = "auto"
    discard_inhibited: bool = False
    last_report_age: float = None    # seconds, None before the first report
    stats: MappingProxyType = field(default_factory=lambda: _frozen({}))
    stats_age: float = None
    stats_actual_pages: int = None   # balloon size when the latest stats arrived
    discard_latency: MappingProxyType = field(default_factory=lambda: _frozen({}))
    counters: MappingProxyType = field(default_factory=lambda: _frozen({}))

    @property
    def target_bytes(self):
        return self.target_pages << PFN_SHIFT

    @property
    def actual_bytes(self):
        return self.actual_pages << PFN_SHIFT

    @property
    def driver_ok(self):
        """The driver has accepted features (it is running)."""
        return bool(self.features_acked)

    @property
    def reporting(self):
        """The driver accepted free page reporting."""
        return "REPORTING" in self.features_acked

    def to_dict(self):
        """Plain JSON-ready dict (the control socket's wire format)."""
        d = {k: (dict(v) if isinstance(v, MappingProxyType) else
                 list(v) if isinstance(v, tuple) else v)
             for k, v in asdict_shallow(self).items()}
        d["target_bytes"] = self.target_bytes
        d["actual_bytes"] = self.actual_bytes
        return d

    @classmethod
    def from_dict(cls, d):
        """The inverse of to_dict (unknown keys are ignored)."""
        kw = {}
        for f in cls.__dataclass_fields__.values():
            if f.name in d:
                v = d[f.name]
                if isinstance(v, list):
                    v = tuple(v)
                elif isinstance(v, dict):
                    v = _frozen(v)
                kw[f.name] = v
        for unit in ("target", "actual"):   # a dict may carry bytes only
            if f"{unit}_pages" not in kw and d.get(f"{unit}_bytes") is not None:
                kw[f"{unit}_pages"] = d[f"{unit}_bytes"] >> PFN_SHIFT
        return cls(**kw)


def asdict_shallow(obj):
    """dataclasses.asdict without deep-copying (mappingproxy cannot be copied)."""
    return {name: getattr(obj, name) for name in obj.__dataclass_fields__}


__all__ = ["DeviceStatus"]
