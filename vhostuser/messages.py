"""vhost-user wire format: header, requests, payload structs, validation.

Validation happens in two stages: ``parse_header`` checks what every
message must satisfy (known request, version, flags, size cap); the
per-request ``decode_*`` functions check the exact payload size and the
number of attached fds.
"""

import enum
import struct
from typing import NamedTuple

from .errors import ProtocolError

HEADER = struct.Struct("<III")
VERSION = 0x1
VERSION_MASK = 0x3
FLAG_REPLY = 1 << 2
FLAG_NEED_REPLY = 1 << 3
KNOWN_FLAGS = VERSION_MASK | FLAG_REPLY | FLAG_NEED_REPLY

MAX_PAYLOAD = 4096
MAX_FDS = 8
MAX_CONFIG_SIZE = 256
MEM_TABLE_MAX_REGIONS = 8

VRING_IDX_MASK = 0xFF
VRING_NOFD = 1 << 8


class Request(enum.IntEnum):
    GET_FEATURES = 1
    SET_FEATURES = 2
    SET_OWNER = 3
    RESET_OWNER = 4
    SET_MEM_TABLE = 5
    SET_LOG_BASE = 6
    SET_LOG_FD = 7
    SET_VRING_NUM = 8
    SET_VRING_ADDR = 9
    SET_VRING_BASE = 10
    GET_VRING_BASE = 11
    SET_VRING_KICK = 12
    SET_VRING_CALL = 13
    SET_VRING_ERR = 14
    GET_PROTOCOL_FEATURES = 15
    SET_PROTOCOL_FEATURES = 16
    GET_QUEUE_NUM = 17
    SET_VRING_ENABLE = 18
    SEND_RARP = 19
    NET_SET_MTU = 20
    SET_BACKEND_REQ_FD = 21
    IOTLB_MSG = 22
    SET_VRING_ENDIAN = 23
    GET_CONFIG = 24
    SET_CONFIG = 25
    CREATE_CRYPTO_SESSION = 26
    CLOSE_CRYPTO_SESSION = 27
    POSTCOPY_ADVISE = 28
    POSTCOPY_LISTEN = 29
    POSTCOPY_END = 30
    GET_INFLIGHT_FD = 31
    SET_INFLIGHT_FD = 32
    GPU_SET_SOCKET = 33
    RESET_DEVICE = 34
    VRING_KICK = 35
    GET_MAX_MEM_SLOTS = 36
    ADD_MEM_REG = 37
    REM_MEM_REG = 38
    SET_STATUS = 39
    GET_STATUS = 40


class BackendRequest(enum.IntEnum):
    IOTLB_MSG = 1
    CONFIG_CHANGE_MSG = 2


class ProtocolFeature(enum.IntEnum):
    MQ = 0
    LOG_SHMFD = 1
    RARP = 2
    REPLY_ACK = 3
    MTU = 4
    BACKEND_REQ = 5
    CROSS_ENDIAN = 6
    CRYPTO_SESSION = 7
    PAGEFAULT = 8
    CONFIG = 9
    BACKEND_SEND_FD = 10
    HOST_NOTIFIER = 11
    INFLIGHT_SHMFD = 12
    RESET_DEVICE = 13
    INBAND_NOTIFICATIONS = 14
    CONFIGURE_MEM_SLOTS = 15
    STATUS = 16


class Header(NamedTuple):
    request: int
    flags: int
    size: int

    @property
    def need_reply(self):
        return bool(self.flags & FLAG_NEED_REPLY)

    @property
    def name(self):
        try:
            return Request(self.request).name
        except ValueError:
            return f"request {self.request}"


class Message(NamedTuple):
    header: Header
    payload: bytes
    fds: list

    @property
    def request(self):
        return self.header.request


def parse_header(raw):
    """First validation stage: every message must pass it."""
    if len(raw) != HEADER.size:
        raise ProtocolError(f"short header: {len(raw)} of {HEADER.size} bytes")
    request, flags, size = HEADER.unpack(raw)
    if flags & VERSION_MASK != VERSION:
        raise ProtocolError(f"unsupported vhost-user version {flags & VERSION_MASK} "
                            f"in request {request} (only 1 exists)")
    if flags & ~KNOWN_FLAGS:
        raise ProtocolError(f"reserved flag bits {flags & ~KNOWN_FLAGS:#x} set in request {request}")
    if flags & FLAG_REPLY:
        raise ProtocolError(f"request {request} has the REPLY flag, which only replies carry")
    if size > MAX_PAYLOAD:
        raise ProtocolError(f"request {request} announces {size} payload bytes; "
                            f"the limit is {MAX_PAYLOAD}")
    return Header(request, flags, size)


def encode(request, payload=b"", flags=VERSION):
    return HEADER.pack(request, flags, len(payload)) + payload


def reply_header(header, payload):
    return HEADER.pack(header.request, VERSION | FLAG_REPLY, len(payload)) + payload


# ---- payload structs -------------------------------------------------------

U64 = struct.Struct("<Q")
VRING_STATE = struct.Struct("<II")
VRING_ADDR = struct.Struct("<IIQQQQ")
MEM_REGION = struct.Struct("<QQQQ")
MEM_TABLE_HEAD = struct.Struct("<II")
MEM_REG_SINGLE = struct.Struct("<Q")  # padding before the region
CONFIG_HEAD = struct.Struct("<III")
INFLIGHT = struct.Struct("<QQHHxxxx")
INFLIGHT_PACKED = struct.Struct("<QQHH")


class VringAddr(NamedTuple):
    index: int
    flags: int
    desc: int
    used: int
    avail: int
    log: int


class MemRegion(NamedTuple):
    gpa: int
    size: int
    uaddr: int
    mmap_offset: int


class ConfigMsg(NamedTuple):
    offset: int
    size: int
    flags: int
    data: bytes


class Inflight(NamedTuple):
    mmap_size: int
    mmap_offset: int
    num_queues: int
    queue_size: int


def _expect(msg, size, nfds=0):
    if len(msg.payload) != size:
        raise ProtocolError(f"{msg.header.name}: payload is {len(msg.payload)} bytes, "
                            f"expected {size}")
    if len(msg.fds) != nfds:
        raise ProtocolError(f"{msg.header.name}: carries {len(msg.fds)} fds, expected {nfds}")


def decode_none(msg):
    _expect(msg, 0)


def decode_u64(msg):
    _expect(msg, U64.size)
    return U64.unpack(msg.payload)[0]


def decode_vring_state(msg):
    _expect(msg, VRING_STATE.size)
    return VRING_STATE.unpack(msg.payload)


def decode_vring_addr(msg):
    _expect(msg, VRING_ADDR.size)
    return VringAddr(*VRING_ADDR.unpack(msg.payload))


def decode_vring_fd(msg):
    """KICK/CALL/ERR: returns (index, fd or None)."""
    if len(msg.payload) != U64.size:
        raise ProtocolError(f"{msg.header.name}: payload is {len(msg.payload)} bytes, expected 8")
    value = U64.unpack(msg.payload)[0]
    if value & ~(VRING_IDX_MASK | VRING_NOFD):
        raise ProtocolError(f"{msg.header.name}: reserved bits set in {value:#x}")
    nofd = bool(value & VRING_NOFD)
    _expect(msg, U64.size, 0 if nofd else 1)
    return value & VRING_IDX_MASK, (None if nofd else msg.fds[0])


def decode_mem_table(msg):
    if len(msg.payload) < MEM_TABLE_HEAD.size:
        raise ProtocolError(f"SET_MEM_TABLE: payload is {len(msg.payload)} bytes, too short")
    count, _pad = MEM_TABLE_HEAD.unpack_from(msg.payload)
    if not 1 <= count <= MEM_TABLE_MAX_REGIONS:
        raise ProtocolError(f"SET_MEM_TABLE: {count} regions (1 to "
                            f"{MEM_TABLE_MAX_REGIONS} allowed)")
    size = MEM_TABLE_HEAD.size + count * MEM_REGION.size
    # QEMU sends only the used entries; accept a full fixed-size table too.
    full = MEM_TABLE_HEAD.size + MEM_TABLE_MAX_REGIONS * MEM_REGION.size
    _expect(msg, size if len(msg.payload) != full else full, count)
    return [MemRegion(*MEM_REGION.unpack_from(msg.payload, MEM_TABLE_HEAD.size + i * MEM_REGION.size))
            for i in range(count)]


def decode_mem_reg(msg, nfds):
    _expect(msg, MEM_REG_SINGLE.size + MEM_REGION.size, nfds)
    return MemRegion(*MEM_REGION.unpack_from(msg.payload, MEM_REG_SINGLE.size))


def decode_config(msg, with_data):
    if len(msg.payload) < CONFIG_HEAD.size:
        raise ProtocolError(f"{msg.header.name}: payload is {len(msg.payload)} bytes, too short")
    offset, size, flags = CONFIG_HEAD.unpack_from(msg.payload)
    if size > MAX_CONFIG_SIZE:
        raise ProtocolError(f"{msg.header.name}: config size {size} over {MAX_CONFIG_SIZE}")
    _expect(msg, CONFIG_HEAD.size + size)
    data = msg.payload[CONFIG_HEAD.size:] if with_data else b""
    return ConfigMsg(offset, size, flags, data)


def encode_config(offset, flags, data):
    return CONFIG_HEAD.pack(offset, len(data), flags) + data


def decode_inflight(msg, nfds):
    if len(msg.payload) == INFLIGHT.size:
        _expect(msg, INFLIGHT.size, nfds)
        return Inflight(*INFLIGHT.unpack(msg.payload))
    _expect(msg, INFLIGHT_PACKED.size, nfds)
    return Inflight(*INFLIGHT_PACKED.unpack(msg.payload))
