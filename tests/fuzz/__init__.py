"""Fuzzing helpers shared by tests/test_fuzz_frontend.py, tests/test_hostile_guest.py
and the long runs in scripts/fuzz_frontend.py and scripts/fuzz_guest.py."""
