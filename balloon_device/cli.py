"""Command line: the daemon, and `ctl` / `qemu-args` subcommands.

    vhost-user-balloon --socket-path PATH [options]     serve one guest
    vhost-user-balloon --print-capabilities             JSON, QEMU convention
    vhost-user-balloon qemu-args --socket-path PATH --memory 1G
    vhost-user-balloon ctl --socket-path PATH status|stats|target SIZE|inhibit on|off
"""

import argparse
import json
import logging
import sys

from vhostuser.errors import SetupError
from vhostuser.loop import Server, open_listener

from . import features as F
from .config import LOG_LEVELS, DaemonConfig, parse_size
from .control import ControlError, ControlServer, request
from .device import BalloonDevice
from .discard import MODES
from .errors import BalloonError

log = logging.getLogger("vhost-user-balloon")


def capabilities():
    return {"type": "balloon",
            "features": ["free-page-reporting", "stats", "page-poison", "deflate-on-oom",
                         "inflate-deflate", "discard-modes:" + ",".join(MODES)]}


def num_queues(reporting=True, stats=True):
    return len(F.queue_roles(F.offered(reporting=reporting, stats=stats)))


def qemu_args(socket_path, memory="1G", queue_size=64, reporting=True, stats=True, chardev="vub0"):
    """The QEMU arguments that attach a guest to this daemon."""
    return [
        "-object", f"memory-backend-memfd,id=mem,size={memory},share=on",
        "-machine", "memory-backend=mem",
        "-chardev", f"socket,id={chardev},path={socket_path}",
        "-device", (f"vhost-user-test-device-pci,chardev={chardev},virtio-id={F.DEVICE_ID},"
                    f"num_vqs={num_queues(reporting, stats)},config_size={F.CONFIG_SIZE},"
                    f"vq_size={queue_size}"),
    ]


def _daemon_parser():
    p = argparse.ArgumentParser(
        prog="vhost-user-balloon",
        description="vhost-user virtio-balloon backend: returns memory the guest reports free "
                    "to the host. Subcommands: 'ctl' (talk to a running daemon), 'qemu-args'.")
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
    p.add_argument("--python-hot-path", action="store_true", help=argparse.SUPPRESS)
    return p


def config_from_args(ns):
    return DaemonConfig(
        socket_path=ns.socket_path, fd=ns.fd, control_socket=ns.control_socket,
        discard=ns.discard, no_discard=ns.no_discard, reporting=not ns.no_reporting,
        stats=not ns.no_stats, stats_interval=ns.stats_interval, deflate_on_oom=ns.deflate_on_oom,
        keep_listening=ns.keep_listening, queue_size=ns.queue_size, log_level=ns.log_level,
        use_c=not ns.python_hot_path)


def serve(cfg):
    device = BalloonDevice(discard_mode=cfg.discard, reporting=cfg.reporting, stats=cfg.stats,
                           deflate_on_oom=cfg.deflate_on_oom, no_discard=cfg.no_discard,
                           stats_interval=cfg.stats_interval, use_c=cfg.use_c)
    listener = open_listener(cfg.socket_path, cfg.fd)
    server = Server(device, listener, keep_listening=cfg.keep_listening, use_c=cfg.use_c)
    control = None
    try:
        if cfg.control_path:
            control = ControlServer(cfg.control_path, device, server)
        server.loop.handle_signals()
        where = cfg.socket_path or f"fd {cfg.fd}"
        log.info("serving virtio-balloon on %s (discard %s%s); control socket %s", where,
                 cfg.discard, ", inhibited" if cfg.no_discard else "", cfg.control_path)
        if cfg.socket_path:
            log.info("QEMU arguments: %s", " ".join(qemu_args(
                cfg.socket_path, "SIZE", cfg.queue_size, cfg.reporting, cfg.stats)))
        server.serve_forever()
    finally:
        if control is not None:
            control.close()
        server.close()
        server.loop.close()
    log.info("stopped")
    return 0


def _ctl(argv):
    p = argparse.ArgumentParser(prog="vhost-user-balloon ctl",
                                description="talk to a running daemon's control socket")
    where = p.add_mutually_exclusive_group(required=True)
    where.add_argument("--control-socket")
    where.add_argument("--socket-path", help="the daemon's vhost-user socket (control is PATH.ctl)")
    sub = p.add_subparsers(dest="cmd", required=True)
    sub.add_parser("status", help="features, queues, target, actual, counters")
    st = sub.add_parser("stats", help="the guest's latest memory statistics")
    st.add_argument("--refresh", action="store_true", help="ask the guest for fresh values first")
    t = sub.add_parser("target", help="set the balloon size (memory taken from the guest)")
    t.add_argument("size", help="e.g. 512MiB, 1G, 0")
    i = sub.add_parser("inhibit", help="switch discarding off (on) or back on (off)")
    i.add_argument("state", choices=("on", "off"))
    ns = p.parse_args(argv)
    path = ns.control_socket or ns.socket_path + ".ctl"
    if ns.cmd == "target":
        req = {"cmd": "target", "bytes": parse_size(ns.size)}
    elif ns.cmd == "inhibit":
        req = {"cmd": "inhibit", "on": ns.state == "on"}
    elif ns.cmd == "stats":
        req = {"cmd": "stats", "refresh": ns.refresh}
    else:
        req = {"cmd": "status"}
    reply = request(path, req)
    print(json.dumps(reply, indent=2, sort_keys=True))
    return 0 if reply.get("ok") else 1


def _qemu_args(argv):
    p = argparse.ArgumentParser(prog="vhost-user-balloon qemu-args",
                                description="print the QEMU arguments that attach a guest")
    p.add_argument("--socket-path", required=True)
    p.add_argument("--memory", default="1G", help="guest memory size, as QEMU writes it")
    p.add_argument("--queue-size", type=int, default=64)
    p.add_argument("--no-reporting", action="store_true")
    p.add_argument("--no-stats", action="store_true")
    ns = p.parse_args(argv)
    if ns.queue_size < F.MIN_REPORTING_QUEUE and not ns.no_reporting:
        raise BalloonError(f"--queue-size {ns.queue_size}: Linux refuses a reporting queue "
                           f"smaller than {F.MIN_REPORTING_QUEUE}")
    print(" ".join(qemu_args(ns.socket_path, ns.memory, ns.queue_size,
                             not ns.no_reporting, not ns.no_stats)))
    return 0


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    try:
        if argv and argv[0] == "ctl":
            return _ctl(argv[1:])
        if argv and argv[0] == "qemu-args":
            return _qemu_args(argv[1:])
        ns = _daemon_parser().parse_args(argv)
        if ns.print_capabilities:
            print(json.dumps(capabilities()))
            return 0
        cfg = config_from_args(ns)
        logging.basicConfig(level=cfg.log_level.upper(),
                            format="%(asctime)s %(name)s %(levelname)s: %(message)s")
        return serve(cfg)
    except (BalloonError, SetupError) as e:
        print(f"vhost-user-balloon: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
