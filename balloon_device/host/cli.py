"""Command line: the daemon, and `ctl` / `qemu-args` subcommands.

    vhost-user-balloon --socket-path PATH [options]     serve one guest
    vhost-user-balloon --guest a=PATH --guest b=PATH    serve several guests
    vhost-user-balloon --print-capabilities             JSON, QEMU convention
    vhost-user-balloon qemu-args --socket-path PATH --memory 1G [--libvirt]
    vhost-user-balloon ctl --socket-path PATH [--guest NAME] status|list|stats|target SIZE|
                       inhibit on|off|stats-interval S|events
    vhost-user-balloon status --control-socket PATH [--watch [S]]
    vhost-user-balloon backend-json                     QEMU vhost-user.json description
    vhost-user-balloon --version

ctl exits 0 when the daemon did what was asked, 1 when it refused (the reply
says why), 2 on a usage error or when it cannot reach the daemon.
"""

import argparse
import json
import logging
import math
import os
import shutil
import sys
import time
from importlib import resources
from xml.sax.saxutils import quoteattr

from vhostuser import implementation
from vhostuser.errors import SetupError

from .. import features as F
from . import status_view
from .config import LOG_LEVELS, DaemonConfig, parse_size
from .control import request, stream
from ..discard import MODES
from .errors import BalloonError
from .multi import Daemon, GuestLogFilter, parse_guest_arg, socket_dir_guests
from .policy import PolicyConfig
from .version import version

log = logging.getLogger("vhost-user-balloon")


def capabilities():
    return {"type": "balloon",
            "features": ["free-page-reporting", "stats", "page-poison", "deflate-on-oom",
                         "inflate-deflate", "discard-modes:" + ",".join(MODES)]}


def num_queues(reporting=True, stats=True):
    return len(F.queue_roles(F.offered(reporting=reporting, stats=stats)))


def device_args(socket_path, queue_size=64, reporting=True, stats=True, chardev="vub0"):
    """-chardev and -device: the balloon itself."""
    return [
        "-chardev", f"socket,id={chardev},path={socket_path.replace(',', ',,')}",  # QEMU: , is ,,
        "-device", (f"vhost-user-test-device-pci,chardev={chardev},virtio-id={F.DEVICE_ID},"
                    f"num_vqs={num_queues(reporting, stats)},config_size={F.CONFIG_SIZE},"
                    f"vq_size={queue_size}"),
    ]


def qemu_args(socket_path, memory="1G", queue_size=64, reporting=True, stats=True, chardev="vub0",
              hugepages=None):
    """The QEMU arguments that attach a guest to this daemon."""
    if hugepages:
        backend = f"memory-backend-file,id=mem,size={memory},mem-path={hugepages},share=on"
    else:
        backend = f"memory-backend-memfd,id=mem,size={memory},share=on"
    return ["-object", backend, "-machine", "memory-backend=mem",
            *device_args(socket_path, queue_size, reporting, stats, chardev)]


def libvirt_xml(socket_path, queue_size=64, reporting=True, stats=True, chardev="vub0",
                hugepages=False):
    """The libvirt domain XML pieces (memoryBacking + qemu:commandline).

    The device is given in QEMU's JSON form: libvirt passes its own devices as
    JSON, and QEMU creates key=value devices before those, so a key=value device
    would take the PCIe slot libvirt gave its first root port.
    """
    device = {"driver": "vhost-user-test-device-pci", "chardev": chardev,
              "virtio-id": F.DEVICE_ID, "num_vqs": num_queues(reporting, stats),
              "config_size": F.CONFIG_SIZE, "vq_size": queue_size}
    args = device_args(socket_path, queue_size, reporting, stats, chardev)[:3]
    args.append(json.dumps(device, separators=(",", ":")))
    source = "<hugepages/>" if hugepages else "<source type='memfd'/>"
    return "\n".join([
        "<!-- <domain type='kvm' xmlns:qemu='http://libvirt.org/schemas/domain/qemu/1.0'> -->",
        "<memoryBacking>",
        f"  {source}",
        "  <access mode='shared'/>",
        "</memoryBacking>",
        "<!-- <memballoon model='none'/> inside <devices>: this daemon is the balloon -->",
        "<qemu:commandline>",
        *(f"  <qemu:arg value={quoteattr(a)}/>" for a in args),
        "</qemu:commandline>",
    ])


def backend_json(binary=None):
    """The QEMU vhost-user.json description, with this installation's binary path."""
    desc = json.loads(resources.files(__package__).joinpath("vhost-user-balloon.json").read_text())
    beside = os.path.join(sys.prefix, "bin", "vhost-user-balloon")  # this installation's script
    found = beside if os.path.exists(beside) else shutil.which("vhost-user-balloon")
    desc["binary"] = binary or found or desc["binary"]
    return desc


def _daemon_parser():
    p = argparse.ArgumentParser(
        prog="vhost-user-balloon", formatter_class=argparse.RawDescriptionHelpFormatter,
        description="vhost-user virtio-balloon backend: returns memory the guest reports free "
                    "to the host.",
        epilog="subcommands (vhost-user-balloon SUBCOMMAND --help):\n" + "\n".join(
            f"  {name:<14}{sub[0]}" for name, sub in SUBCOMMANDS.items()))
    p.add_argument("--version", action="version", version=f"%(prog)s {version()}")
    where = p.add_mutually_exclusive_group()
    where.add_argument("--socket-path", help="listen on this Unix socket (created mode 0600)")
    where.add_argument("--fd", type=int, help="use this inherited socket fd (listening or connected)")
    p.add_argument("--print-capabilities", action="store_true", help="print capabilities as JSON and exit")
    p.add_argument("--discard", default="auto", choices=MODES,
                   help="how to return memory: auto (default: punch-hole on memfd/shmem/hugetlbfs), "
                        "punch-hole, remove; dontneed/free only free private memory and are refused")
    p.add_argument("--no-discard", action="store_true",
                   help="complete reports without freeing memory (VFIO device assignment, postcopy)")
    p.add_argument("--no-reporting", action="store_true", help="do not offer free page reporting")
    p.add_argument("--no-stats", action="store_true", help="do not offer the stats queue")
    p.add_argument("--stats-interval", type=float, default=0.0, metavar="S",
                   help="ask the guest for fresh memory stats every S seconds (0 = off)")
    p.add_argument("--deflate-on-oom", action="store_true", help="offer VIRTIO_BALLOON_F_DEFLATE_ON_OOM")
    p.add_argument("--control-socket", help="control socket path (default: SOCKET_PATH.ctl)")
    p.add_argument("--keep-listening", action="store_true",
                   help="wait for the next frontend after a disconnect instead of exiting")
    p.add_argument("--queue-size", type=int, default=64,
                   help="vq_size to use in QEMU (>= 32 with reporting); printed in the QEMU arguments")
    p.add_argument("--log-level", default="info", choices=LOG_LEVELS)
    p.add_argument("--supervise", action=argparse.BooleanOptionalAction, default=None,
                   help="run the daemon under the built-in supervisor, which keeps every fd the "
                        "frontends gave (systemd's fd store protocol) and restarts it without "
                        "QEMU noticing (default: on, unless started by systemd (NOTIFY_SOCKET "
                        "or LISTEN_FDS set) or given --fd)")
    p.add_argument("--log-format", default="text", choices=("text", "json"),
                   help="text (default; without a timestamp when stderr is the systemd journal) "
                        "or one JSON object per line for log shippers")
    p.add_argument("--python-hot-path", action="store_true", help=argparse.SUPPRESS)
    # the supervisor's units of a multi-guest daemon (supervisor.py): one guest's serving
    # process (--unit guest --only-guest NAME=PATH) or the manager (--unit manager)
    p.add_argument("--unit", choices=("guest", "manager"), help=argparse.SUPPRESS)
    p.add_argument("--only-guest", metavar="NAME=PATH", help=argparse.SUPPRESS)
    p.add_argument("--unit-watchdog", type=float, default=30.0, metavar="S",
                   help="supervised multi-guest daemon: a guest's serving process (or the "
                        "manager) that sends no watchdog ping for S seconds is killed and "
                        "restarted (default 30; 0 = off)")
    p.add_argument("--guest-processes", choices=("per-guest", "shared"), default="per-guest",
                   help="supervised multi-guest daemon: per-guest (default) serves each guest "
                        "in its own process (a fault costs one guest; ~7 MiB per guest); "
                        "shared serves every guest in one supervised process (restarts "
                        "survive, but a fault in it costs every guest a restart; the "
                        "smallest footprint, for the tightest hosts)")
    sec = p.add_argument_group("least privilege (applied once the sockets exist)")
    sec.add_argument("--user", help="switch to this user (sockets are chowned to it first)")
    sec.add_argument("--group", help="switch to this group (default: the user's group)")
    sec.add_argument("--socket-group", metavar="GROUP",
                     help="give the guest sockets to this group, mode 0660 (the group QEMU runs "
                          "in, e.g. kvm), so that the daemon need not run as QEMU's user")
    sec.add_argument("--control-socket-group", metavar="GROUP",
                     help="give the control socket to this group, mode 0660 (operators); it "
                          "never goes to --user, so QEMU running as that user cannot use it")
    sec.add_argument("--seccomp", nargs="?", const="errno", choices=("errno", "log", "kill"),
                     help="install a seccomp system call allowlist; other calls fail with EPERM "
                          "(errno, the default), are only logged (log) or kill the daemon (kill)")
    p.add_argument("--name", help="the guest's name in logs, status and metrics "
                                  "(default: the socket file name without .sock)")
    many = p.add_argument_group("several guests, one daemon")
    many.add_argument("--guest", action="append", default=[], metavar="NAME=PATH",
                      help="serve guest NAME on Unix socket PATH; repeat for every guest")
    many.add_argument("--socket-dir", metavar="DIR", help="with --guests: sockets DIR/NAME.sock")
    many.add_argument("--guests", metavar="a,b,c", help="with --socket-dir: the guests' names")
    met = p.add_argument_group("metrics")
    met.add_argument("--metrics-port", type=int, metavar="PORT",
                     help="serve Prometheus metrics on http://ADDRESS:PORT/metrics (0 = any port)")
    met.add_argument("--metrics-address", default="127.0.0.1", metavar="ADDR",
                     help="address for --metrics-port (default 127.0.0.1)")
    pol = p.add_argument_group("host memory policy")
    pol.add_argument("--policy", action="store_true",
                     help="set balloon targets to keep host memory above --policy-floor")
    d = PolicyConfig()
    pol.add_argument("--policy-floor", default="2GiB", metavar="SIZE",
                     help="host memory to keep available (default 2GiB)")
    pol.add_argument("--policy-guest-min", default="256MiB", metavar="SIZE",
                     help="memory every guest keeps whatever happens (default 256MiB)")
    pol.add_argument("--policy-margin", default="128MiB", metavar="SIZE",
                     help="never take a guest's last SIZE of available memory (default 128MiB)")
    pol.add_argument("--policy-hysteresis", default="512MiB", metavar="SIZE",
                     help="give memory back only when the host has floor + SIZE (default 512MiB)")
    pol.add_argument("--policy-psi", type=float, default=d.psi_threshold, metavar="PCT",
                     help="memory PSI 'some avg10' percentage that counts as pressure "
                          f"(default {d.psi_threshold:g}; 0 = ignore PSI)")
    pol.add_argument("--policy-psi-step", default="256MiB", metavar="SIZE",
                     help="memory to reclaim per interval under PSI pressure (default 256MiB)")
    pol.add_argument("--policy-interval", type=float, default=d.interval, metavar="S",
                     help=f"seconds between policy decisions (default {d.interval:g})")
    pol.add_argument("--policy-cgroup", metavar="DIR",
                     help="read host memory as this memory cgroup's limit - usage (v1 or v2)")
    pol.add_argument("--policy-sweep", default="128MiB", metavar="SIZE",
                     help="raise a quiet guest's balloon by SIZE and lower it again, so the guest "
                          "hands back free memory reporting cannot see (default 128MiB; 0 = off)")
    pol.add_argument("--policy-sweep-quiet", type=float, default=d.sweep_quiet, metavar="S",
                     help="a guest is swept after S seconds without allocating "
                          f"(default {d.sweep_quiet:g})")
    pol.add_argument("--policy-sweep-every", type=float, default=d.sweep_every, metavar="S",
                     help=f"sweep a quiet guest again after S seconds (default {d.sweep_every:g})")
    pol.add_argument("--policy-sweep-timeout", type=float, default=d.sweep_timeout, metavar="S",
                     help="give a sweep up (and the guest its memory back) when the balloon has "
                          f"not got there after S seconds (default {d.sweep_timeout:g})")
    pol.add_argument("--policy-fast-reclaim", action=argparse.BooleanOptionalAction,
                     default=d.fast_reclaim,
                     help="under pressure, inflate a guest with a lot of free memory by what of "
                          "it the host still holds (minus half the margin) at once and deflate "
                          "once the balloon got there, instead of waiting for free page "
                          "reporting (default off)")
    pol.add_argument("--policy-fast-interval", type=float, default=d.fast_interval, metavar="S",
                     help="seconds between policy decisions (and stats requests) while the host "
                          f"is short or a fast reclaim runs (default {d.fast_interval:g})")
    pol.add_argument("--policy-fast-min", default="256MiB", metavar="SIZE",
                     help="fast-reclaim a guest only when at least SIZE of its free memory is "
                          "still backed on the host (default 256MiB)")
    pol.add_argument("--policy-fast-timeout", type=float, default=d.fast_timeout, metavar="S",
                     help="give a fast reclaim up after S seconds (default "
                          f"{d.fast_timeout:g})")
    pol.add_argument("--policy-fast-cooldown", type=float, default=d.fast_cooldown, metavar="S",
                     help="fast-reclaim the same guest again only S seconds after the last "
                          f"one ended (default {d.fast_cooldown:g})")
    pol.add_argument("--policy-fast-settle", type=float, default=d.fast_settle, metavar="S",
                     help="take a guest's free memory only once it stayed free S seconds, so a "
                          "guest that reuses it at once keeps it (default "
                          f"{d.fast_settle:g}; 0 = at once)")
    pol.add_argument("--policy-taskstats", action=argparse.BooleanOptionalAction,
                     default=d.taskstats,
                     help="read each guest's QEMU memory stalls from Linux taskstats (needs "
                          "CAP_NET_ADMIN and delay accounting; default on)")
    pol.add_argument("--policy-stall", type=float, default=d.stall_ms, metavar="MS",
                     help="a QEMU that waits MS milliseconds per second or more on reclaim, "
                          "thrashing or swap-in gets its balloon back first and is squeezed "
                          f"last (default {d.stall_ms:g})")
    pol.add_argument("--taskstats-delayacct", action="store_true",
                     help="switch delay accounting on at start (sysctl kernel.task_delayacct=1; "
                          "docs/operations.md)")
    return p


def _guests_from_args(ns):
    guests = [parse_guest_arg(g) for g in ns.guest]
    if ns.socket_dir or ns.guests:
        if not (ns.socket_dir and ns.guests):
            raise BalloonError("--socket-dir and --guests go together: --socket-dir DIR --guests a,b")
        guests += socket_dir_guests(ns.socket_dir, ns.guests)
    return tuple(guests)


def _policy_from_args(ns):
    if not ns.policy:
        return None
    return PolicyConfig(
        floor_bytes=parse_size(ns.policy_floor), guest_min_bytes=parse_size(ns.policy_guest_min),
        margin_bytes=parse_size(ns.policy_margin),
        hysteresis_bytes=parse_size(ns.policy_hysteresis), psi_threshold=ns.policy_psi,
        psi_step_bytes=parse_size(ns.policy_psi_step), interval=ns.policy_interval,
        stats_max_age=max(30.0, 3 * ns.policy_interval), cgroup=ns.policy_cgroup,
        sweep_bytes=parse_size(ns.policy_sweep), sweep_quiet=ns.policy_sweep_quiet,
        sweep_every=ns.policy_sweep_every, sweep_timeout=ns.policy_sweep_timeout,
        fast_reclaim=ns.policy_fast_reclaim, fast_interval=ns.policy_fast_interval,
        fast_min_bytes=parse_size(ns.policy_fast_min), fast_timeout=ns.policy_fast_timeout,
        fast_cooldown=ns.policy_fast_cooldown, fast_settle=ns.policy_fast_settle,
        taskstats=ns.policy_taskstats,
        stall_ms=ns.policy_stall, delayacct=ns.taskstats_delayacct)


def config_from_args(ns):
    guests, policy, metrics_port = _guests_from_args(ns), _policy_from_args(ns), ns.metrics_port
    if ns.unit == "guest":   # one guest's serving process: no policy, no metrics
        if not ns.only_guest:
            raise BalloonError("--unit guest needs --only-guest NAME=PATH")
        guests, policy, metrics_port = (parse_guest_arg(ns.only_guest),), None, None
    elif ns.unit == "manager" and not guests:
        raise BalloonError("--unit manager serves a multi-guest daemon (--guest)")
    if ns.unit_watchdog < 0 or not math.isfinite(ns.unit_watchdog):
        raise BalloonError(f"--unit-watchdog {ns.unit_watchdog}: seconds >= 0 (0 = off)")
    return DaemonConfig(
        socket_path=ns.socket_path, fd=ns.fd, control_socket=ns.control_socket,
        discard=ns.discard, no_discard=ns.no_discard, reporting=not ns.no_reporting,
        stats=not ns.no_stats, stats_interval=ns.stats_interval, deflate_on_oom=ns.deflate_on_oom,
        keep_listening=ns.keep_listening, queue_size=ns.queue_size, log_level=ns.log_level,
        log_format=ns.log_format, name=ns.name, guests=guests,
        metrics_port=metrics_port, metrics_address=ns.metrics_address,
        policy=policy, seccomp=ns.seccomp, user=ns.user, group=ns.group,
        socket_group=ns.socket_group, control_socket_group=ns.control_socket_group)


def supervised(ns, env=None):
    """--supervise, or by default when nothing else keeps the fds (see --help)."""
    if ns.supervise is not None:
        return ns.supervise
    env = os.environ if env is None else env
    return ns.fd is None and not env.get("NOTIFY_SOCKET") and not env.get("LISTEN_FDS")


def _sandbox(cfg, daemon):
    """Non-dumpable, socket groups, --user/--group, then --seccomp, once every socket
    exists (balloon_device/host/sandbox.py)."""
    from . import notify, sandbox
    sandbox.set_nondumpable()
    guest_paths = [g.socket_path for g in daemon.guests.values() if g.socket_path]
    socket_gid = None
    if cfg.socket_group is not None:
        if not guest_paths:
            log.warning("--socket-group: no guest socket path (--fd): nothing to change")
        socket_gid = sandbox.share_sockets(guest_paths, cfg.socket_group, "--socket-group")
    if cfg.control_socket_group is not None and cfg.control_path:
        sandbox.share_sockets([cfg.control_path], cfg.control_socket_group,
                              "--control-socket-group")
    if cfg.user is not None or cfg.group is not None:
        sandbox.drop_privileges(cfg.user, cfg.group, guest_paths, socket_gid)
    if cfg.seccomp is not None:
        notify.prepare()  # no socket()/connect() under the filter
        sandbox.apply_seccomp(cfg.seccomp)
        for listener in _listeners(daemon):
            listener.unlink_on_close = False  # no unlink either: the next start removes them


def _listeners(daemon):
    out = [g.server.listener for g in daemon.guests.values()]
    if daemon.control is not None:
        out.append(daemon.control.listener)
    return out


def _warn_shared_dir(cfg, daemon):
    """An AppArmor rule for the guest sockets (DIR/*.sock) must not reach the control socket."""
    ctl = cfg.control_path
    if not ctl or not ctl.endswith(".sock"):
        return
    dirs = {os.path.dirname(os.path.abspath(g.socket_path)) for g in daemon.guests.values()
            if g.socket_path}
    if os.path.dirname(os.path.abspath(ctl)) in dirs:
        log.warning("the control socket %s is in the same folder as guest sockets: a rule that "
                    "lets QEMU reach the guest sockets (e.g. AppArmor DIR/*.sock) may reach it "
                    "too; put it elsewhere with --control-socket (docs/troubleshooting.md)", ctl)


def serve_manager(cfg):
    """The manager unit of a supervised multi-guest daemon (manager.py)."""
    from . import sandbox
    from .manager import Manager
    manager = Manager(cfg)
    try:
        manager.loop.handle_signals()
        sandbox.set_nondumpable()
        if cfg.control_socket_group is not None:
            sandbox.share_sockets([cfg.control_path], cfg.control_socket_group,
                                  "--control-socket-group")
        if cfg.user is not None or cfg.group is not None or cfg.seccomp is not None:
            log.info("--user/--group/--seccomp apply to the guests' serving processes; the "
                     "manager maps no guest memory and keeps the starting user, so that it "
                     "can reach each guest's control socket (owned by that user, as the "
                     "main one, so that QEMU cannot)")
        log.info("%s; control socket %s", manager.describe(), cfg.control_path)
        manager.serve_forever()
    finally:
        manager.close()
    log.info("stopped")
    return 0


def serve(cfg, unit=None):
    daemon = Daemon(cfg)
    if unit == "guest":
        daemon.live = False
        if daemon.control is not None:
            daemon.control.admin = None   # the manager adds and removes guests
    try:
        daemon.loop.handle_signals()
        _warn_shared_dir(cfg, daemon)
        _sandbox(cfg, daemon)
        log.info("%s (discard %s%s); control socket %s", daemon.describe(), cfg.discard,
                 ", inhibited" if cfg.no_discard else "", cfg.control_path)
        for name, guest in daemon.guests.items():
            if guest.socket_path:
                log.info("QEMU arguments for %s: %s", name, " ".join(qemu_args(
                    guest.socket_path, "SIZE", cfg.queue_size, cfg.reporting, cfg.stats)))
        daemon.serve_forever()
    finally:
        daemon.close()
    log.info("stopped")
    return 0


def _ctl_parser():
    p = argparse.ArgumentParser(prog="vhost-user-balloon ctl",
                                description="talk to a running daemon's control socket",
                                epilog="exit status: 0 done, 1 the daemon refused (the reply says "
                                       "why), 2 usage error or daemon unreachable")
    where = p.add_mutually_exclusive_group(required=True)
    where.add_argument("--control-socket")
    where.add_argument("--socket-path", help="the daemon's vhost-user socket (control is PATH.ctl)")
    guest_help = ("which guest (needed when the daemon serves several); before or after "
                  "the command")
    p.add_argument("--guest", help=guest_help)
    after = argparse.ArgumentParser(add_help=False)   # --guest after the subcommand too
    after.add_argument("--guest", default=argparse.SUPPRESS, help=guest_help)
    sub = p.add_subparsers(dest="cmd", required=True, metavar="COMMAND")
    sub.add_parser("status", parents=[after], help="features, queues, target, actual, counters")
    sub.add_parser("list", help="status of every guest the daemon serves")
    st = sub.add_parser("stats", parents=[after], help="the guest's latest memory statistics")
    st.add_argument("--refresh", action="store_true", help="ask the guest for fresh values first")
    t = sub.add_parser("target", parents=[after],
                       help="set the balloon size (memory taken from the guest)")
    t.add_argument("size", help="e.g. 512MiB, 1.5G, 0")
    i = sub.add_parser("inhibit", parents=[after],
                       help="switch discarding off (on) or back on (off)")
    i.add_argument("state", choices=("on", "off"))
    sub.add_parser("upgrade", help="hand every session over to a new daemon process started "
                                   "from the installed program, without QEMU noticing")
    si = sub.add_parser("stats-interval", parents=[after],
                        help="ask for fresh memory stats every S seconds from now on (0 = off); "
                             "every guest unless --guest")
    si.add_argument("seconds", type=float, metavar="S")
    ev = sub.add_parser("events", parents=[after],
                        help="stream balloon changes (target, actual) as JSON lines until Ctrl-C")
    ev.add_argument("--count", type=int, metavar="N", help="stop after N events")
    ag = sub.add_parser("add-guest", help="serve one more guest from now on (multi-guest "
                                          "daemon); its own process under the supervisor")
    ag.add_argument("spec", metavar="NAME=PATH", help="the guest's name and socket path")
    rg = sub.add_parser("remove-guest", help="stop serving a guest (its QEMU sees the socket "
                                             "close) and drop its fds from the fd store")
    rg.add_argument("name", metavar="NAME")
    return p


def _ctl_events(path, req, count):
    """Print the daemon's events, one JSON object per line."""
    n = 0
    try:
        for event in stream(path, req):
            if event.get("ok") is False:
                print(json.dumps(event, indent=2, sort_keys=True))
                return 1
            print(json.dumps(event, sort_keys=True), flush=True)
            n += 1
            if count is not None and n >= count:
                return 0
    except KeyboardInterrupt:
        return 0
    print("vhost-user-balloon: the daemon closed the event stream", file=sys.stderr)
    return 1


def _ctl(argv):
    ns = _ctl_parser().parse_args(argv)
    path = ns.control_socket or ns.socket_path + ".ctl"
    if ns.cmd == "target":
        req = {"cmd": "target", "bytes": parse_size(ns.size)}
    elif ns.cmd == "inhibit":
        req = {"cmd": "inhibit", "on": ns.state == "on"}
    elif ns.cmd == "stats":
        req = {"cmd": "stats", "refresh": ns.refresh}
    elif ns.cmd == "stats-interval":
        if not math.isfinite(ns.seconds) or ns.seconds < 0:
            raise BalloonError(f"stats-interval {ns.seconds}: seconds >= 0 (0 = off)")
        req = {"cmd": "stats-interval", "seconds": ns.seconds}
    elif ns.cmd == "add-guest":
        name, sock = parse_guest_arg(ns.spec)
        req = {"cmd": "add-guest", "guest": name, "path": os.path.abspath(sock)}
    elif ns.cmd == "remove-guest":
        req = {"cmd": "remove-guest", "guest": ns.name}
    else:
        req = {"cmd": ns.cmd}
    if ns.guest and ns.cmd not in ("list", "add-guest", "remove-guest"):
        req["guest"] = ns.guest
    if ns.cmd == "events":
        return _ctl_events(path, req, ns.count)
    reply = request(path, req)
    print(json.dumps(reply, indent=2, sort_keys=True))
    return 0 if reply.get("ok") else 1


def qemu_size(text):
    """--memory as QEMU reads it: '4G', '1.5G' -> '1536M', '4GiB' -> '4G'."""
    size = parse_size(text)
    if size <= 0:
        raise BalloonError(f"--memory {text}: the guest needs some memory")
    for suffix, shift in (("T", 40), ("G", 30), ("M", 20), ("K", 10)):
        if size % (1 << shift) == 0:
            return f"{size >> shift}{suffix}"
    return str(size)


def _qemu_args_parser():
    p = argparse.ArgumentParser(prog="vhost-user-balloon qemu-args",
                                description="print the QEMU arguments that attach a guest")
    p.add_argument("--socket-path", required=True)
    p.add_argument("--memory", default="1G", help="guest memory size (e.g. 4G, 1.5G, 512MiB)")
    p.add_argument("--queue-size", type=int, default=64, help="a power of two (default 64)")
    p.add_argument("--no-reporting", action="store_true")
    p.add_argument("--no-stats", action="store_true")
    p.add_argument("--chardev-id", default="vub0", help="QEMU id of the chardev (default vub0)")
    p.add_argument("--hugepages", metavar="PATH",
                   help="back guest RAM with files in this hugetlbfs mount (e.g. /dev/hugepages)")
    p.add_argument("--libvirt", action="store_true",
                   help="print libvirt domain XML (memoryBacking + qemu:commandline) instead")
    return p


def _qemu_args(argv):
    ns = _qemu_args_parser().parse_args(argv)
    memory = qemu_size(ns.memory)
    if ns.queue_size & (ns.queue_size - 1) or not 1 <= ns.queue_size <= 32768:
        raise BalloonError(f"--queue-size {ns.queue_size}: a power of two up to 32768 "
                           "(virtio split rings)")
    if ns.queue_size < F.MIN_REPORTING_QUEUE and not ns.no_reporting:
        raise BalloonError(f"--queue-size {ns.queue_size}: Linux refuses a reporting queue "
                           f"smaller than {F.MIN_REPORTING_QUEUE}")
    if ns.hugepages and not os.path.isdir(ns.hugepages):
        raise BalloonError(f"--hugepages {ns.hugepages}: no such folder (mount hugetlbfs there)")
    if ns.libvirt:
        print(libvirt_xml(ns.socket_path, ns.queue_size, not ns.no_reporting, not ns.no_stats,
                          ns.chardev_id, bool(ns.hugepages)))
        return 0
    print(" ".join(qemu_args(ns.socket_path, memory, ns.queue_size,
                             not ns.no_reporting, not ns.no_stats, ns.chardev_id, ns.hugepages)))
    return 0


def _backend_json_parser():
    p = argparse.ArgumentParser(
        prog="vhost-user-balloon backend-json",
        description="print the QEMU vhost-user backend description (docs/interop/vhost-user.json) "
                    "for /usr/share/qemu/vhost-user/50-vhost-user-balloon.json")
    p.add_argument("--binary", help="the daemon's path (default: as found on PATH)")
    return p


def _backend_json(argv):
    ns = _backend_json_parser().parse_args(argv)
    print(json.dumps(backend_json(ns.binary), indent=2))
    return 0


def stderr_is_journal(environ=None, stderr=None):
    """True when stderr is systemd's journal stream (JOURNAL_STREAM=DEV:INODE matches it),
    which stamps every line itself."""
    value = (os.environ if environ is None else environ).get("JOURNAL_STREAM", "")
    dev, _, ino = value.partition(":")
    try:
        st = os.fstat((stderr or sys.stderr).fileno())
        return (st.st_dev, st.st_ino) == (int(dev), int(ino))
    except (ValueError, OSError, AttributeError):
        return False


class JsonFormatter(logging.Formatter):
    """One JSON object per line: time (UTC, ISO 8601), level, logger, guest, message."""

    def format(self, record):
        out = {"time": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
                       + f".{int(record.msecs):03d}Z",
               "level": record.levelname.lower(), "logger": record.name,
               "message": record.getMessage()}
        guest = getattr(record, "guest", "").strip().strip("[]")
        if guest:
            out["guest"] = guest
        if record.exc_info:
            out["exception"] = self.formatException(record.exc_info)
        return json.dumps(out)


def log_formatter(fmt="text", journal=False):
    if fmt == "json":
        return JsonFormatter()
    if journal:
        return logging.Formatter("%(levelname)s: %(guest)s%(message)s")
    return logging.Formatter("%(asctime)s %(name)s %(levelname)s: %(guest)s%(message)s")


def _setup_logging(cfg):
    handler = logging.StreamHandler()
    handler.addFilter(GuestLogFilter(show=bool(cfg.guests)))
    handler.setFormatter(log_formatter(cfg.log_format, stderr_is_journal()))
    logging.basicConfig(level=cfg.log_level.upper(), handlers=[handler])


# name -> (one line of help, parser factory, runner(argv))
SUBCOMMANDS = {
    "ctl": ("talk to a running daemon: status, list, stats, target, inhibit, stats-interval, "
            "events, add-guest, remove-guest", _ctl_parser, _ctl),
    "status": ("every guest a running daemon serves, as a table (--watch)",
               status_view.parser, status_view.main),
    "qemu-args": ("print the QEMU arguments (or libvirt XML) that attach a guest",
                  _qemu_args_parser, _qemu_args),
    "backend-json": ("print the QEMU vhost-user backend description (JSON)",
                     _backend_json_parser, _backend_json),
}


def main(argv=None, parser=None):
    """parser: an argument parser built beforehand (the supervisor's forked units: building
    one costs each process megabytes of private memory)."""
    argv = sys.argv[1:] if argv is None else argv
    try:
        if argv and argv[0] in SUBCOMMANDS:
            return SUBCOMMANDS[argv[0]][2](argv[1:])
        ns = (parser or _daemon_parser()).parse_args(argv)
        if ns.print_capabilities:
            print(json.dumps(capabilities()))
            return 0
        cfg = config_from_args(ns)
        if ns.python_hot_path:   # the pure-Python twins (as VUB_PURE_PYTHON=1)
            implementation.select(False)
        _setup_logging(cfg)
        if supervised(ns) and ns.unit is None:
            from . import supervisor
            return supervisor.run(argv, cfg, watchdog=ns.unit_watchdog if cfg.guests else 0.0,
                                  shared=ns.guest_processes == "shared")
        if ns.unit == "manager":
            return serve_manager(cfg)
        return serve(cfg, ns.unit)
    except (BalloonError, SetupError) as e:
        print(f"vhost-user-balloon: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
