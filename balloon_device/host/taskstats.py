"""Per-guest memory pressure from the host kernel: Linux taskstats of each QEMU.

PSI and MemAvailable say the host is short, not which guest suffers. Taskstats over
generic netlink (delay accounting: sysctl kernel.task_delayacct=1, or the daemon's
--taskstats-enable-delayacct) give, for a whole process (TGID: all its threads), the
nanoseconds spent waiting in direct reclaim (freepages_delay_total), on thrashing
pages (refaults of recently evicted pages: thrashing_delay_total), in memory
compaction and in swap-in, and its page fault counts. The QEMU process of a guest is
its vhost-user frontend: its pid comes from the connection (SO_PEERCRED,
GuestStatus.frontend_pid).

pyroute2's TaskStats decodes struct taskstats up to version 7 (cpu_scaled_run_real_total)
and one layout of version 15. The struct only grows at its end (include/uapi/linux/
taskstats.h): v8 freepages, v9 thrashing, v10 ac_btime64, v11 compact, v12 ac_tgid
.. ac_exe_inode, v13 wpcopy, v14 irq, v15 *_delay_max/min in between the totals
(pyroute2's tstats_v15), v16 the same max/min moved to the end. Below, the message
class picks a struct class with exactly the fields of the version the kernel sent
(newer versions: the v16 prefix, which they keep).
"""

import logging
import struct
import time
from dataclasses import dataclass

from pyroute2.netlink import NLM_F_REQUEST
from pyroute2.netlink.generic import AsyncGenericNetlinkSocket
from pyroute2.netlink.taskstats import (TASKSTATS_CMD_GET, AsyncTaskStats, TaskStats,
                                         TStatsBase, taskstatsmsg, tcmd)

log = logging.getLogger("vhost-user-balloon.taskstats")

DELAYACCT_SYSCTL = "/proc/sys/kernel/task_delayacct"

# fields each version adds at the end of the struct
_ADDED = (
    (8, (("freepages_count", "Q"), ("freepages_delay_total", "Q"))),
    (9, (("thrashing_count", "Q"), ("thrashing_delay_total", "Q"))),
    (10, (("ac_btime64", "Q"),)),
    (11, (("compact_count", "Q"), ("compact_delay_total", "Q"))),
    (12, (("ac_tgid", "I"), ("ac_tgetime", "Q"), ("ac_exe_dev", "Q"), ("ac_exe_inode", "Q"))),
    (13, (("wpcopy_count", "Q"), ("wpcopy_delay_total", "Q"))),
    (14, (("irq_count", "Q"), ("irq_delay_total", "Q"))),
    (16, tuple((f"{k}_delay_{m}", "Q") for k in ("cpu", "blkio", "swapin", "freepages",
                                                  "thrashing", "compact", "wpcopy", "irq")
               for m in ("max", "min"))),
)
NEWEST = 16
_classes = {}


def stats_class(version):
    """The nla_struct class that decodes struct taskstats of this version."""
    if version == 15:
        return TStatsBase.tstats_v15       # pyroute2 has that layout right
    version = min(version, NEWEST)
    if version not in _classes:
        fields = list(TStatsBase.tstats_vB.fields)   # versions 1-7
        for v, added in _ADDED:
            if v <= version and v != 15:
                fields.extend(added)
        # native alignment (no prefix in the format) pads ac_tgetime to 8 as the kernel does
        _classes[version] = type(f"tstats_v{version}", (TStatsBase.tstats_vB,),
                                 {"fields": tuple(fields), "__slots__": ()})
    return _classes[version]


class _Versioned:
    __slots__ = ()

    @staticmethod
    def versioned_stats(self, *argv, **kwarg):
        if "value" in kwarg:                   # encoding (tests): the value says
            return stats_class(kwarg["value"].get("version", NEWEST))
        # the first field of the struct, after the 4-byte attribute header, is its version
        (version,) = struct.unpack_from("H", kwarg["data"], kwarg["offset"] + 4)
        return stats_class(version)


class TaskstatsMsg(_Versioned, taskstatsmsg):
    """pyroute2's taskstatsmsg, decoding every struct version up to 16."""

    class aggr_pid(_Versioned, taskstatsmsg.aggr_pid):
        pass

    class aggr_tgid(_Versioned, taskstatsmsg.aggr_tgid):
        pass


class _AsyncSocket(AsyncTaskStats):
    async def bind(self):
        await AsyncGenericNetlinkSocket.bind(self, "TASKSTATS", TaskstatsMsg)

    async def get_tgid_stat(self, tgid):
        msg = tcmd()
        msg["cmd"] = TASKSTATS_CMD_GET
        msg["version"] = 1
        msg["attrs"].append(["TASKSTATS_CMD_ATTR_TGID", tgid])
        return await self.nlm_request(msg, self.prid, msg_flags=NLM_F_REQUEST)


class TaskstatsSocket(TaskStats):
    """pyroute2's TaskStats socket with TaskstatsMsg and whole-process queries."""
    async_class = _AsyncSocket

    def get_tgid_stat(self, tgid):
        return self._run_sync_cleanup(self.asyncore.get_tgid_stat, tgid)


def stats_of_reply(msgs):
    """A taskstats reply (list of messages) -> {field: value} of its struct."""
    for msg in msgs:
        for kind in ("TASKSTATS_TYPE_AGGR_TGID", "TASKSTATS_TYPE_AGGR_PID"):
            aggr = msg.get_attr(kind)
            if aggr is not None:
                st = aggr.get_attr("TASKSTATS_TYPE_STATS")
                if st is not None:
                    out = {k: v for k, v in st.items() if k not in ("header", "attrs")}
                    comm = out.get("ac_comm")
                    if isinstance(comm, bytes):
                        out["ac_comm"] = comm.split(b"\0", 1)[0].decode(errors="replace")
                    return out
    raise LookupError("taskstats reply without TASKSTATS_TYPE_STATS")


# ---- the per-guest signal ----------------------------------------------------

DELAYS = ("freepages_delay_total", "thrashing_delay_total", "compact_delay_total",
          "swapin_delay_total")


@dataclass(frozen=True)
class Pressure:
    """A guest's QEMU over the last interval: milliseconds per second spent stalled
    on memory (reclaim + thrashing + compaction + swap-in), each part, and faults/s."""
    pid: int
    stall_ms_per_s: float = 0.0
    reclaim_ms_per_s: float = 0.0
    thrashing_ms_per_s: float = 0.0
    swapin_ms_per_s: float = 0.0
    major_faults_per_s: float = 0.0
    minor_faults_per_s: float = 0.0
    version: int = 0

    def to_dict(self):
        return dict(self.__dict__)


def proc_faults(pid, proc="/proc"):
    """{ac_minflt, ac_majflt} of a whole process from /proc/PID/stat ({} if gone)."""
    try:
        with open(f"{proc}/{pid}/stat") as f:
            text = f.read()
    except OSError:
        return {}
    fields = text[text.rindex(")") + 2:].split()    # after "pid (comm) "
    return {"ac_minflt": int(fields[7]), "ac_majflt": int(fields[9])}


def delayacct_enabled(path=DELAYACCT_SYSCTL):
    try:
        with open(path) as f:
            return f.read().strip() == "1"
    except OSError:
        return None


def enable_delayacct(path=DELAYACCT_SYSCTL):
    with open(path, "w") as f:
        f.write("1\n")


class PressureReader:
    """Samples each guest's QEMU through taskstats and turns the counters into rates.

    query(pid) -> {field: value} (default: a TaskstatsSocket, opened on first use).
    A failing query is logged once per pid and gives no signal (None)."""

    def __init__(self, query=None, clock=time.monotonic):
        self._query = query
        self._sock = None
        self.clock = clock
        self._prev = {}           # pid -> (time, stats)
        self._failed = set()
        self.error = None         # why taskstats gave nothing, for status

    def open(self):
        """Open the netlink socket now (before --seccomp forbids new sockets).
        False (logged) if taskstats is not available."""
        if self._query is not None or self._sock is not None:
            return True
        try:
            sock = TaskstatsSocket()
            try:
                sock.bind()
            except BaseException:
                sock.close()
                raise
        except Exception as e:
            self.error = f"no taskstats: {e}"
            log.warning("taskstats (generic netlink) is not available: %s; the policy goes "
                        "without per-guest pressure from the host kernel", e)
            return False
        self._sock = sock
        if delayacct_enabled() is False:
            log.warning("delay accounting is off (sysctl kernel.task_delayacct=0): taskstats "
                        "reports no reclaim or thrashing delays; switch it on with "
                        "--taskstats-delayacct or sysctl (docs/operations.md)")
        return True

    def query(self, pid):
        if self._query is not None:
            return self._query(pid)
        if self._sock is None and not self.open():
            raise OSError(self.error)
        stats = stats_of_reply(self._sock.get_tgid_stat(pid))
        # a TGID reply carries the delays summed over the threads, but no fault counts
        # (the kernel fills those per thread only): take the process's from /proc
        stats.update(proc_faults(pid))
        return stats

    def close(self):
        if self._sock is not None:
            self._sock.close()
            self._sock = None

    def sample(self, pids):
        """{name: pid or None} -> {name: Pressure or None (no pid, first sample, error)}."""
        now = self.clock()
        out, seen = {}, set()
        for name, pid in pids.items():
            out[name] = None
            if not pid:
                continue
            seen.add(pid)
            try:
                stats = self.query(pid)
            except Exception as e:       # netlink errors, gone processes, no taskstats
                self.error = f"taskstats of pid {pid}: {e}"
                if pid not in self._failed:
                    self._failed.add(pid)
                    log.warning("cannot read taskstats of pid %d (guest %s): %s; this guest "
                                "gets no host-side pressure signal", pid, name, e)
                self._prev.pop(pid, None)
                continue
            self._failed.discard(pid)
            self.error = None
            prev = self._prev.get(pid)
            self._prev[pid] = (now, stats)
            if prev is None or now <= prev[0]:
                continue
            out[name] = pressure_between(pid, prev[1], stats, now - prev[0])
        for pid in set(self._prev) - seen:
            del self._prev[pid]
        return out


def pressure_between(pid, old, new, dt):
    """Rates between two taskstats samples dt seconds apart (counters that went back,
    e.g. a new process with the same pid, count as 0)."""
    def rate(key, scale=1.0):
        d = new.get(key, 0) - old.get(key, 0)
        return max(0, d) * scale / dt
    ms = 1e-6
    parts = {k: rate(k, ms) for k in DELAYS}
    return Pressure(pid=pid, stall_ms_per_s=sum(parts.values()),
                    reclaim_ms_per_s=parts["freepages_delay_total"] + parts["compact_delay_total"],
                    thrashing_ms_per_s=parts["thrashing_delay_total"],
                    swapin_ms_per_s=parts["swapin_delay_total"],
                    major_faults_per_s=rate("ac_majflt"), minor_faults_per_s=rate("ac_minflt"),
                    version=new.get("version", 0))
