# Boot: code from ROMFS where the platform maps it (in place, outside the heap), else lib/.
import os, sys
rom = getattr(os, "getenv", lambda name: None)("EDGEBFT_ROM")  # set by edgebft.devices.romboot
if rom:
    import uctypes, vfs
    address, size = rom.split(":")
    # VfsRom is in ports built with ROMFS (romboot's Unix port), not in the stubs' ESP32
    image = uctypes.bytearray_at(int(address), int(size))
    vfs.mount(vfs.VfsRom(image), "/rom")  # pyright: ignore[reportAttributeAccessIssue]
    sys.path.insert(0, "/rom/lib")
sys.path.append("lib")
from edgebft.firmware import board
why = board.safe_mode()  # before the node's modules: one of them may be what crashes
if why:
    print("edgebft: safe mode: %s; the node does not start, the REPL is free" % why)
else:
    try:  # a sensor's image has sensor.json (firmware/sensor.py), a replica's edgebft.json
        os.stat("sensor.json")
        from edgebft.firmware import sensor as app
    except OSError:
        # Without ROMFS the modules load into the heap, and loading one leaves garbage around
        # what it keeps. The protocol's (replica.py imports them) go first, into a heap still
        # whole, then that garbage is collected before the rest load: on the Unix port, a
        # node booting from lib/ needs 141 KB of heap instead of 161 KB.
        import gc
        from edgebft.protocol import replica
        gc.collect()
        from edgebft.firmware import runtime as app
    app.main()
