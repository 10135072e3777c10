# Flash store: the replica's durable state in one file, replaced atomically (and small
# integers in files of their own, the same way).
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


def load_int(path):
    """The integer saved at ``path``; 0 when none was saved (or the file is not one)."""
    saved = load(path)
    try:
        return int(saved) if saved else 0
    except ValueError:
        return 0


def save_int(n, path):
    save(str(n).encode(), path)
