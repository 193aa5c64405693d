"""The device runtime's parts: see the modules (``offload``: the offload client)."""
