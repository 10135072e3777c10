# Flash store: the replica's durable state in one file, replaced atomically.
#
# Rules:
# - save() writes a temporary file and renames it over the old one, so a crash leaves either
#   the old or the new state, never a torn one (LittleFS and POSIX rename are atomic).
# - The replica decides how often state changes (once per view and per stable checkpoint),
#   which bounds flash writes; this module writes exactly when asked.
import os

STATE_PATH = "state.cbor"


def load(path=STATE_PATH):
    """The saved bytes, or None when nothing was saved."""
    try:
        with open(path, "rb") as f:
            return f.read()
    except OSError:
        return None


def save(data, path=STATE_PATH):
    tmp = path + ".tmp"
    with open(tmp, "wb") as f:
        f.write(data)
    os.rename(tmp, path)
