"""Test doubles for vhost-user backends: a driver-side virtqueue over real
shared memory (driver) and a socketpair frontend (frontend).  Shared by the
tests, the benchmarks and the fuzzers; nothing in the daemon imports it."""
