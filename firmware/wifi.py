# WiFi for a board (firmware/board.py's network link): imported only when the configuration
# names a network and the port has one, so emulation never loads it.
#
# Rules:
# - The station interface comes up with power saving off (asleep between beacons, the radio
#   adds up to a beacon interval, ~100 ms, to every message), then connects, retried with
#   back-off until it is up; the LED shows "connecting" meanwhile.
import time

import network

try:
    from micropython import const
except ImportError:  # CPython
    const = int

_TIMEOUT_MS = const(15000)
_BACKOFF_MAX_MS = const(30000)


def connect(wifi, led):
    """Join the WiFi network ``wifi`` ({"ssid", "password"}), retrying with back-off until
    connected; ``led`` (board.Led) shows "connecting" meanwhile."""
    wlan = network.WLAN(network.STA_IF)
    wlan.active(True)
    try:
        wlan.config(pm=wlan.PM_NONE)
    except (AttributeError, ValueError, OSError):
        pass  # a port without power management
    backoff = 1000
    while not wlan.isconnected():
        print("wifi: joining %r" % wifi["ssid"])
        wlan.connect(wifi["ssid"], wifi.get("password", ""))
        start = time.ticks_ms()
        while not wlan.isconnected() \
                and time.ticks_diff(time.ticks_ms(), start) < _TIMEOUT_MS:
            led.show("connecting", time.ticks_ms())
            time.sleep_ms(50)
        if wlan.isconnected():
            break
        print("wifi: %r not joined (status %d); again in %d ms"
              % (wifi["ssid"], wlan.status(), backoff))
        wlan.disconnect()
        time.sleep_ms(backoff)
        backoff = min(2 * backoff, _BACKOFF_MAX_MS)
    print("wifi: joined %r as %s" % (wifi["ssid"], wlan.ifconfig()[0]))
