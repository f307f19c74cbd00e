"""Generic vhost-user backend library.

Layers: connection (socket + fd passing), messages (wire structs and
validation), memory (guest memory table), vring (split virtqueue),
handler (protocol state), loop (event loop), device (the interface a
device implements). Nothing here knows about any particular device.
"""
