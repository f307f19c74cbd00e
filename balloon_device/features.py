"""virtio-balloon feature bits and the compact queue numbering."""

from vhostuser.device import VIRTIO_F_VERSION_1, VIRTIO_RING_F_EVENT_IDX

MUST_TELL_HOST = 1 << 0
STATS_VQ = 1 << 1
DEFLATE_ON_OOM = 1 << 2
FREE_PAGE_HINT = 1 << 3
PAGE_POISON = 1 << 4
REPORTING = 1 << 5

DEVICE_ID = 5
CONFIG_SIZE = 16
PFN_SHIFT = 12  # balloon page frame numbers are always 4 KiB units
MIN_REPORTING_QUEUE = 32  # Linux refuses a smaller reporting queue

NAMES = {
    MUST_TELL_HOST: "MUST_TELL_HOST", STATS_VQ: "STATS_VQ", DEFLATE_ON_OOM: "DEFLATE_ON_OOM",
    FREE_PAGE_HINT: "FREE_PAGE_HINT", PAGE_POISON: "PAGE_POISON", REPORTING: "REPORTING",
    VIRTIO_RING_F_EVENT_IDX: "RING_EVENT_IDX", VIRTIO_F_VERSION_1: "VERSION_1",
}


def offered(reporting=True, stats=True, deflate_on_oom=False):
    f = VIRTIO_F_VERSION_1 | VIRTIO_RING_F_EVENT_IDX | PAGE_POISON
    if stats:
        f |= STATS_VQ
    if reporting:
        f |= REPORTING
    if deflate_on_oom:
        f |= DEFLATE_ON_OOM
    return f


def queue_roles(features):
    """Queue index -> role, numbered compactly as Linux and QEMU do."""
    roles = ["inflate", "deflate"]
    if features & STATS_VQ:
        roles.append("stats")
    if features & FREE_PAGE_HINT:
        roles.append("free_page_hint")
    if features & REPORTING:
        roles.append("reporting")
    return roles


def names(features):
    return [name for bit, name in sorted(NAMES.items()) if features & bit]
