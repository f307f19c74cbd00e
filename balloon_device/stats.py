"""The guest's memory statistics: 10-byte {le16 tag, le64 value} entries."""

import struct

ENTRY = struct.Struct("<HQ")
MAX_BUFFER = 64 * 1024  # far above what any driver sends

TAGS = {
    0: "swap_in", 1: "swap_out", 2: "major_faults", 3: "minor_faults", 4: "free_memory",
    5: "total_memory", 6: "available_memory", 7: "disk_caches", 8: "hugetlb_allocations",
    9: "hugetlb_failures", 10: "oom_kills", 11: "alloc_stalls", 12: "async_scans",
    13: "direct_scans", 14: "async_reclaims", 15: "direct_reclaims",
}


def parse(data):
    """Dict name -> value; unknown tags are kept as 'tag_N'. Trailing bytes ignored."""
    out = {}
    for i in range(len(data) // ENTRY.size):
        tag, value = ENTRY.unpack_from(data, i * ENTRY.size)
        out[TAGS.get(tag, f"tag_{tag}")] = value
    return out
