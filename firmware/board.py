# The board layer: what a node needs of its hardware. The network link, a watchdog, a status
# LED, why it booted, and a safe mode. On an ESP32 each is the chip's; on the Unix port
# (emulation, virtual boards) each part the port lacks is what the port has instead: the
# host's network (no WiFi to join), no watchdog (the host supervises the process), an LED that
# is a state the status reports, and "power-on" as the reset cause of every process start.
#
# Rules:
# - Safe mode: a board boots without starting the node, its REPL free, while the file
#   SAFE_PATH exists (remove it to leave), or once SAFE_AFTER boots in a row crashed. A boot
#   counts as crashed until the node has run STABLE_MS (stable() clears the count); the safe
#   boot clears it too, so the reset after it tries the node again. A board in a crash loop
#   (a bad configuration, a module that fails at import) is then recovered over its REPL
#   without reflashing. Crash counting is a board's: on the Unix port, where the host kills
#   and restarts nodes at will, only the environment variable EDGEBFT_SAFE_AFTER turns it on
#   (with its count; a virtual board, a test).
# - WiFi: firmware/wifi.py, imported only by a board that has a network to join.
# - Watchdog ("watchdog_ms" in the configuration, default 0: off): started once the node runs
#   and fed at every tick of its timers, so a node whose event loop stands still longer is
#   reset. The chip's cannot be stopped once started: a deploy that interrupts the node at
#   the REPL must end within it (deploy's writes are atomic, so a reset mid-deploy loses
#   nothing, and the next deploy skips what was written).
# - LED states: "connecting" (2 Hz blink), "backup" (a 50 ms blip every 2 s), "primary"
#   (steady) and "fault" (10 Hz blink); on a WS2812 also blue, green, white and red. The LED
#   is written only when it changes.
import os
import sys
import time

try:
    from micropython import const
except ImportError:  # CPython
    const = int

from edgebft.firmware import store

ON_BOARD = sys.platform not in ("linux", "darwin", "win32")
SAFE_PATH = "safe"
CRASHES_PATH = "crashes"
SAFE_AFTER = const(3)       # a board's crashed boots in a row before a safe one
STABLE_MS = const(30000)    # a node that ran this long did not crash at boot
_COLOURS = {"connecting": (0, 0, 40), "backup": (0, 40, 0), "primary": (40, 40, 40),
            "fault": (40, 0, 0)}
# state -> (period ms, ms lit at its start)
_BLINK = {"connecting": (500, 250), "backup": (2000, 50), "primary": (1, 1), "fault": (100, 50)}
_RESET_CAUSES = ("power-on", "hard reset", "watchdog", "deep sleep", "soft reset")


def reset_cause():
    """Why this boot happened: "power-on", "hard reset", "watchdog", "deep sleep" or "soft
    reset" (machine.reset_cause()); "power-on" for a process start on the Unix port."""
    if not ON_BOARD:
        return "power-on"
    import machine
    cause = machine.reset_cause()
    return _RESET_CAUSES[cause - 1] if 1 <= cause <= len(_RESET_CAUSES) else "unknown"


def safe_mode():
    """Why this boot is a safe one (see the rules), or "" when it is not. Counts this boot
    as crashed until stable() says otherwise."""
    try:
        os.stat(SAFE_PATH)
        return "the file %r exists (remove it to start the node)" % SAFE_PATH
    except OSError:
        pass
    limit = SAFE_AFTER
    if not ON_BOARD:
        limit = int(getattr(os, "getenv", lambda name: None)("EDGEBFT_SAFE_AFTER") or 0)
    if not limit:
        return ""
    crashes = store.load_int(CRASHES_PATH)
    if crashes >= limit:
        store.save_int(0, CRASHES_PATH)
        return "%d boots in a row crashed (the next reset tries again)" % crashes
    store.save_int(crashes + 1, CRASHES_PATH)
    return ""


def stable():
    """The node has run STABLE_MS: this boot did not crash."""
    if store.load_int(CRASHES_PATH):
        store.save_int(0, CRASHES_PATH)


class Watchdog:
    """The chip's watchdog with a ``ms`` timeout, started at once; none when ``ms`` is 0 or
    on the Unix port."""

    def __init__(self, ms):
        self.wdt = None
        if ms and ON_BOARD:
            import machine
            self.wdt = machine.WDT(timeout=ms)

    def feed(self):
        if self.wdt is not None:
            self.wdt.feed()


class Clock:
    """Milliseconds since it was made, never wrapping: time.ticks_ms wraps (after ~12 days on
    an ESP32, ticks_diff only spans half that), so now() adds up the ticks between calls, and
    must be called at least once per few days."""

    def __init__(self):
        self.ticks = time.ticks_ms()
        self.ms = 0

    def now(self):
        t = time.ticks_ms()
        self.ms += time.ticks_diff(t, self.ticks)
        self.ticks = t
        return self.ms


class Led:
    """The status LED of ``spec`` ({"pin", "kind": "gpio" or "ws2812"}, or None). ``state`` is
    the state shown last (the status reports it)."""

    def __init__(self, spec):
        self.state = None
        self._lit = None
        self._pin = None
        self._pixel = None
        if spec and ON_BOARD:
            import machine
            if spec.get("kind") == "ws2812":
                import neopixel
                self._pixel = neopixel.NeoPixel(machine.Pin(spec["pin"]), 1)
            else:
                self._pin = machine.Pin(spec["pin"], machine.Pin.OUT)

    def show(self, state, clock_ms):
        """Show ``state`` as of ``clock_ms`` (any monotonic milliseconds)."""
        period, lit_ms = _BLINK[state]
        lit = clock_ms % period < lit_ms
        if state == self.state and lit == self._lit:
            return
        self.state = state
        self._lit = lit
        if self._pin is not None:
            self._pin.value(1 if lit else 0)
        elif self._pixel is not None:
            self._pixel[0] = _COLOURS[state] if lit else (0, 0, 0)
            self._pixel.write()
