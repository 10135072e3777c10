# Flash store: files on the device filesystem (LittleFS on a board, the image folder in
# emulation). The replica's durable record and small counters are whole files replaced
# atomically; its replicated state lives in the folder STATE_DIR behind Flash, the
# filesystem implementation of protocol/flash.py's interface.
#
# Rules:
# - save() and Flash.write() write a temporary file and rename it over the old one, so a crash
#   leaves either the old or the new bytes, never a torn file (LittleFS and POSIX rename are
#   atomic, and replace an existing destination).
# - The replica decides how often state changes (once per view and per stable checkpoint for
#   its record, once per checkpoint interval for each page it changed), which bounds flash
#   writes; this module writes exactly when asked, and Flash counts what it writes.
import os

# Bound as globals, not found as builtins: see cbor.py's header.
from builtins import bytearray, bytes, int, len, memoryview, str, sum, tuple, type

STATE_PATH = "state.cbor"
STATE_DIR = "state"
_TMP = ".tmp"
_TMP_BYTES = b".tmp"
_ZEROS_BYTES = 256


def load(path=STATE_PATH):
    """The saved bytes, or None when nothing was saved. Read in one allocation of the
    file's size (read() with no size grows its buffer 256 bytes at a time, each step a
    reallocation that fragments the heap)."""
    try:
        with open(path, "rb") as f:
            size = f.seek(0, 2)
            f.seek(0)
            return f.read(size)
    except OSError:
        return None


def _put(path, data):
    """Write ``data`` (bytes, or a tuple of byte strings written in turn) to ``path``. Runs
    per page written: no ``with``, and no for loop in _write_to, keep the frames within 11
    slots (protocol/cbor.py's header), off the heap."""
    _write_to(open(path, "wb"), data)


def _write_to(f, data):
    """Write ``data`` as _put takes it to open file ``f``, then close it."""
    try:
        if type(data) is tuple:
            _write_pieces(f, data)
        else:
            f.write(data)
    finally:
        f.close()


def _write_pieces(f, pieces):
    for piece in pieces:
        f.write(piece)


def _opened(path):
    """``path`` open for reading; None when it cannot be (no such file)."""
    try:
        return open(path, "rb")
    except OSError:
        return None


def _file_size(f):
    """The size of open file ``f``, which is then read from its start; -1 when unknown."""
    try:
        size = f.seek(0, 2)
        f.seek(0)
        return size
    except OSError:
        return -1


def _read_all(f, buf):
    """Read open file ``f`` into bytearray ``buf``, cut to what was read (the file shrank
    under us); None when reading fails."""
    try:
        return _cut(buf, f.readinto(buf))
    except OSError:
        return None


def _cut(buf, n):
    if n < len(buf):
        buf[n:] = b""
    return buf


def save(data, path=STATE_PATH):
    """Replace ``path`` (str or bytes) with ``data`` (as _put takes it), atomically."""
    tmp = path + _TMP_BYTES if type(path) is bytes else path + _TMP
    _put(tmp, data)
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


class Flash:
    """protocol/flash.py's flash on the filesystem: one file per name in folder ``root``."""

    def __init__(self, root=STATE_DIR):
        try:
            os.mkdir(root)
        except OSError:
            pass  # there already
        self.root = root
        self.folder = (root + "/").encode()  # one concatenation a path, not two
        self.writes = 0
        self.bytes_written = 0
        # _lengthen's zeros: a Flash's, not the module's (a sensor imports this module for
        # load_int() in a 64 KB heap, and 256 bytes more there kept its MQTT client from
        # starting)
        self._zeros = memoryview(bytes(_ZEROS_BYTES))
        torn = [entry[0] for entry in os.ilistdir(root) if entry[0].endswith(_TMP)]
        for name in torn:
            self.delete(name)  # a write a power cut interrupted

    def _path(self, name):
        """The file of ``name`` as a bytes path. A new str is first looked for among the
        interned strings (~1,000 with a node's code: ~1.5 us on the Unix port), and the
        filesystem layer makes another of a str path; a bytes path takes neither lookup
        (per file operation: 8.0 us to open and read a page by str path, 5.8 by bytes)."""
        return self.folder + name.encode()

    def read(self, name):
        return load(self._path(name))

    def read_into(self, name, buf):
        # Runs per page read: this and its helpers keep their frames within 11 slots
        # (protocol/cbor.py's header), off the heap: no ``with``, each try in a helper.
        f = _opened(self._path(name))
        if f is None:
            return None
        size = _file_size(f)
        buf = None if size < 0 else _read_all(f, self._sized(buf, size))
        f.close()
        return buf

    def _sized(self, buf, size):
        if not buf:
            return bytearray(size)  # one block, not a zeroed copy and a reallocation
        if len(buf) > size:
            buf[size:] = b""
        elif len(buf) < size:
            self._lengthen(buf, size)
        return buf

    def _lengthen(self, buf, size):
        """Lengthen bytearray ``buf`` to ``size`` bytes with zeros copied through slices of
        one memoryview (32-byte objects), not a temporary bytes of the difference: a page
        read into a spare buffer shorter than the page took one (418-458 bytes), an
        out-of-heap restart in a fragmented heap. Within the capacity a shrunk bytearray
        kept, nothing else is allocated."""
        while len(buf) < size:
            n = size - len(buf)
            buf.extend(self._zeros[:n if n < _ZEROS_BYTES else _ZEROS_BYTES])

    def read_at(self, name, offset, n):
        try:
            with open(self._path(name), "rb") as f:
                f.seek(offset)
                return f.read(n)
        except OSError:
            return None

    def size(self, name):
        try:
            return os.stat(self._path(name))[6]
        except OSError:
            return -1

    def free(self):
        st = os.statvfs(self.root)
        return st[1] * st[4]  # fragment size x blocks available

    def names(self, prefix, limit):
        found = []
        for entry in os.ilistdir(self.root):
            if len(found) == limit:
                break
            if entry[0].startswith(prefix):
                found.append(entry[0])
        return found

    def write(self, name, data, atomic=True):
        if atomic:
            save(data, self._path(name))
        else:
            _put(self._path(name), data)
        self._count(sum(len(piece) for piece in data) if type(data) is tuple else len(data))

    def append(self, name, data):
        with open(self._path(name), "ab") as f:
            f.write(data)
        self._count(len(data))

    def rename(self, src, dst):
        os.rename(self._path(src), self._path(dst))

    def delete(self, name):
        try:
            os.remove(self._path(name))
        except OSError:
            pass

    def _count(self, n):
        self.writes += 1
        self.bytes_written += n
