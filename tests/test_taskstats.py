"""Per-guest pressure from taskstats: the struct layouts per version, a recorded kernel
reply, rates from fake counters, the QEMU pid from SO_PEERCRED, and one real query of
this test process (needs root / CAP_NET_ADMIN: CI runs as root; fails loudly without)."""

import logging
import os
import socket
import struct
import time
from pathlib import Path

import pytest

from balloon_device.host.taskstats import (PressureReader, TaskstatsMsg, TaskstatsSocket,
                                           pressure_between, proc_faults, stats_class,
                                           stats_of_reply)

DATA = Path(__file__).parent / "data"


def size_of(version):
    return struct.calcsize("".join(fmt for _, fmt in stats_class(version).fields))


# sizeof(struct taskstats) per version, from include/uapi/linux/taskstats.h: v7 ends at
# cpu_scaled_run_real_total (312 bytes); each version adds its fields at the end
# (v12: u32 ac_tgid, 4 bytes of padding, then three u64; v15 and v16: 16 more u64).
SIZES = {7: 312, 8: 328, 9: 344, 10: 352, 11: 368, 12: 400, 13: 416, 14: 432, 15: 560,
         16: 560, 17: 560}


@pytest.mark.parametrize("version", sorted(SIZES))
def test_struct_size_per_version(version):
    assert size_of(version) == SIZES[version]


def test_v16_puts_max_and_min_at_the_end_v15_in_between():
    names16 = [n for n, _ in stats_class(16).fields]
    names15 = [n for n, _ in stats_class(15).fields]
    assert names16.index("irq_delay_total") < names16.index("cpu_delay_max")
    assert names15.index("cpu_delay_max") < names15.index("blkio_count")
    assert names16[:names16.index("irq_delay_total") + 1] == \
        [n for n, _ in stats_class(14).fields]


def recorded():
    data = (DATA / "taskstats_v16_pid.bin").read_bytes()
    msg = TaskstatsMsg(data)
    msg.decode()
    return msg


def test_recorded_kernel_reply_v16():
    """A reply of Linux 6.18 (struct version 16) for a python process, pid 4983,
    recorded with TaskstatsSocket().get_pid_stat()."""
    st = stats_of_reply([recorded()])
    assert st["version"] == 16
    assert st["ac_pid"] == st["ac_tgid"] == 4983          # v12 field after the v11 ones
    assert st["ac_comm"] == "python"
    assert st["ac_btime64"] == st["ac_btime"] == 1796138644  # v10
    assert st["ac_exe_inode"] == 26723
    assert st["cpu_count"] == 82 and st["cpu_delay_total"] == 1083548285
    assert st["cpu_delay_max"] == 152042137 and st["cpu_delay_min"] == 20230   # v16 tail
    assert st["ac_minflt"] == 6134


def test_pyroute2s_own_decoder_misses_the_new_fields():
    """Why TaskstatsMsg exists: pyroute2's taskstatsmsg decodes a v16 struct with its
    version-7 layout (no freepages / thrashing fields)."""
    from pyroute2.netlink.taskstats import taskstatsmsg
    msg = taskstatsmsg((DATA / "taskstats_v16_pid.bin").read_bytes())
    msg.decode()
    st = msg.get_attr("TASKSTATS_TYPE_AGGR_PID").get_attr("TASKSTATS_TYPE_STATS")
    assert "freepages_delay_total" not in st and "thrashing_delay_total" not in st


def as_version(data, version):
    """The recorded v16 reply as an older kernel would send it: the struct cut to that
    version's size, its version field set, the three enclosing lengths fixed.
    Layout: nlmsghdr (16) + genlmsghdr (4), then AGGR_PID {PID (8), STATS (4 + struct)}."""
    buf = bytearray(data)
    cut = SIZES[16] - SIZES[version]
    struct.pack_into("H", buf, 36, version)
    for off in (0, 20, 32):                       # nlmsg_len, AGGR_PID nla_len, STATS nla_len
        fmt = "I" if off == 0 else "H"
        (n,) = struct.unpack_from(fmt, buf, off)
        struct.pack_into(fmt, buf, off, n - cut)
    return bytes(buf[:len(buf) - cut])


@pytest.mark.parametrize("version", [8, 9, 10, 11, 12, 13, 14, 16])
def test_older_versions_decode_their_own_fields(version):
    data = (DATA / "taskstats_v16_pid.bin").read_bytes()
    full = stats_of_reply([recorded()])
    msg = TaskstatsMsg(as_version(data, version))
    msg.decode()
    st = stats_of_reply([msg])
    assert st["version"] == version
    assert set(st) == {n for n, _ in stats_class(version).fields if not n.startswith("_")}
    for name, value in st.items():
        if name != "version":
            assert value == full[name], name
    assert ("thrashing_delay_total" in st) == (version >= 9)
    assert ("ac_tgid" in st) == (version >= 12)


# ---- rates -------------------------------------------------------------------------

def counters(reclaim=0, thrash=0, swapin=0, compact=0, majflt=0, minflt=0):
    ms = 1_000_000
    return {"version": 16, "freepages_delay_total": reclaim * ms,
            "thrashing_delay_total": thrash * ms, "swapin_delay_total": swapin * ms,
            "compact_delay_total": compact * ms, "ac_majflt": majflt, "ac_minflt": minflt}


def test_pressure_between_two_samples():
    p = pressure_between(7, counters(), counters(reclaim=300, thrash=100, compact=50,
                                                 swapin=50, majflt=20, minflt=4000), 2.0)
    assert p.stall_ms_per_s == 250 and p.reclaim_ms_per_s == 175
    assert p.thrashing_ms_per_s == 50 and p.swapin_ms_per_s == 25
    assert p.major_faults_per_s == 10 and p.minor_faults_per_s == 2000
    # a counter that went back (a new process with the same pid) counts as 0
    assert pressure_between(7, counters(reclaim=500), counters(), 1.0).stall_ms_per_s == 0


def test_reader_rates_from_fake_replies(caplog):
    now = [100.0]
    replies = {11: [counters(), counters(reclaim=80)], 12: [counters(), counters()]}

    def query(pid):
        if pid == 13:
            raise OSError("no such process")
        return replies[pid].pop(0)
    r = PressureReader(query=query, clock=lambda: now[0])
    first = r.sample({"a": 11, "b": 12, "c": None})
    assert first == {"a": None, "b": None, "c": None}     # rates need two samples
    now[0] += 0.5
    second = r.sample({"a": 11, "b": 12, "c": None})
    assert second["a"].stall_ms_per_s == 160 and second["b"].stall_ms_per_s == 0
    with caplog.at_level(logging.WARNING):
        assert r.sample({"d": 13}) == {"d": None}
        r.sample({"d": 13})
    assert len([m for m in caplog.messages if "pid 13" in m]) == 1   # logged once
    assert "no such process" in r.error


def test_proc_faults_of_this_process():
    f = proc_faults(os.getpid())
    assert f["ac_minflt"] > 0 and f["ac_majflt"] >= 0
    assert proc_faults(2 ** 22 + 12345) == {}


def test_frontend_pid_from_so_peercred():
    from vhostuser.loop import peer_pid
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        assert peer_pid(a) == os.getpid()
    finally:
        a.close()
        b.close()
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        assert peer_pid(s) is None
    finally:
        s.close()


# ---- the real kernel -----------------------------------------------------------------

def test_real_taskstats_of_this_process():
    """Taskstats over generic netlink for this very process: the fields land where the
    kernel puts them (checked against values we know from elsewhere). Needs
    CAP_NET_ADMIN (CI runs as root): without it this fails, it does not skip."""
    sock = TaskstatsSocket()
    try:
        sock.bind()
        pid = os.getpid()
        st = stats_of_reply(sock.get_pid_stat(pid))
        assert st["version"] >= 8, "kernel too old for freepages_delay_total"
        assert st["ac_pid"] == pid and st["ac_comm"]
        if st["version"] >= 12:
            assert st["ac_tgid"] == pid
            assert st["ac_exe_inode"] == os.stat("/proc/self/exe").st_ino
        if st["version"] >= 10:
            assert st["ac_btime64"] == st["ac_btime"]
        if st["version"] >= 16:
            assert st["cpu_delay_min"] <= st["cpu_delay_max"] <= st["cpu_delay_total"]
        t0 = st["cpu_run_real_total"]
        end = time.thread_time() + 0.05
        while time.thread_time() < end:                    # 50 ms of this thread's CPU
            pass
        st2 = stats_of_reply(sock.get_pid_stat(pid))
        # ns; the kernel accounts a running task's time at ticks and context switches
        assert st2["cpu_run_real_total"] >= t0 + 20_000_000
        whole = stats_of_reply(sock.get_tgid_stat(pid))    # all threads: at least as much
        assert whole["cpu_run_real_total"] >= st2["cpu_run_real_total"]
    finally:
        sock.close()


def test_real_pressure_reader():
    r = PressureReader()
    try:
        assert r.open(), r.error
        r.sample({"me": os.getpid()})
        time.sleep(0.05)
        p = r.sample({"me": os.getpid()})["me"]
        assert p is not None and p.pid == os.getpid() and p.version >= 8
        assert p.stall_ms_per_s >= 0 and p.minor_faults_per_s >= 0
    finally:
        r.close()


def test_taskstats_work_under_seccomp_once_opened():
    """The daemon opens the netlink socket before --seccomp (which allows only Unix
    sockets); queries must then work under the strictest mode (kill)."""
    import subprocess
    import sys
    code = ("import os, time\n"
            "from balloon_device.host.taskstats import PressureReader\n"
            "from balloon_device.host import sandbox\n"
            "r = PressureReader()\n"
            "assert r.open(), r.error\n"
            "sandbox.apply_seccomp('kill')\n"
            "r.sample({'me': os.getpid()})\n"
            "time.sleep(0.05)\n"
            "p = r.sample({'me': os.getpid()})['me']\n"
            "assert p is not None and p.pid == os.getpid(), r.error\n"
            "print('ok')\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=120, cwd=Path(__file__).parent.parent)
    assert out.returncode == 0 and out.stdout.strip() == "ok", (out.returncode, out.stderr)
