# Boot: code from ROMFS where the platform maps it (in place, outside the heap), else lib/.
import os, sys
rom = getattr(os, "getenv", lambda name: None)("EDGEBFT_ROM")  # set by edgebft.devices.romboot
if rom:
    import uctypes, vfs
    address, size = rom.split(":")
    vfs.mount(vfs.VfsRom(uctypes.bytearray_at(int(address), int(size))), "/rom")
    sys.path.insert(0, "/rom/lib")
sys.path.append("lib")
try:  # a sensor's image has sensor.json (firmware/sensor.py), a replica's edgebft.json
    os.stat("sensor.json")
    from edgebft.firmware import sensor as app
except OSError:
    from edgebft.firmware import runtime as app
app.main()
