# The flash a replica keeps its state in, as an interface, and its in-memory implementation.
#
# Rules (what every implementation gives; firmware/store.py's Flash puts it on a filesystem):
# - A flat namespace of named byte strings ("files").
# - write(name, data) and rename(src, dst) replace dst atomically: after a power cut a name
#   holds either its old or its new bytes, never a mix. data is bytes, or a tuple of byte
#   strings written one after the other (a caller never joins them in RAM).
#   write(name, data, atomic=False) and append() are not atomic (a power cut may leave the
#   name torn, e.g. truncated): use them only for files a restart discards or checks (pages
#   of a version above the stable checkpoint, state transfer staging). A non-atomic write
#   skips the temporary file and rename: half the filesystem work on the hot path.
# - read() of a missing name gives None; size() of one gives -1; delete() of one does nothing.
#   read_into(name, buf) gives name's bytes in a bytearray instead: ``buf`` resized to their
#   length (a shrunk bytearray keeps its block: a buffer read into again and again takes no
#   new heap while what it holds fits), or a new one when ``buf`` is empty; None, buf
#   untouched, for a missing name.
# - names(prefix, limit) lists at most limit names that start with prefix (a list in RAM:
#   a flash holds thousands of pages).
# - writes and bytes_written count every write and append: flash wears out.
# - free() tells how many bytes are left.
#
# MemFlash is the flash of the simulator and the unit tests. It can cut the power: cut(k) undoes
# its last k operations (of the at most JOURNAL_MAX it remembers), which is the flash a node
# leaves when it dies k operations earlier, in the middle of whatever it was writing; the
# oldest operation it undoes, if it was a non-atomic write, is left torn (its first half).
# cut() never undoes an operation made before the last sent(): its owner calls sent() when a
# message leaves, and a node that died before an operation never sent what came after it (a
# replica writes its P entries ahead of its COMMITs, replica.py).

# Bound as globals, not found as builtins: see cbor.py's header.
from builtins import bytes, len, min, sum, tuple, type

JOURNAL_MAX = 64


class MemFlash:
    """Flash held in a dict; its operations can be undone (cut) to model a power cut."""

    def __init__(self, capacity=1 << 40):
        self.capacity = capacity
        self.files = {}
        self.journal = []  # (name, bytes before or None, torn bytes or None), newest last
        self.unsent = 0    # operations since the last sent(): the most cut() undoes
        self.writes = 0
        self.bytes_written = 0

    def read(self, name):
        return self.files.get(name)

    def read_into(self, name, buf):
        data = self.files.get(name)
        if data is None:
            return None
        buf[:] = data
        return buf

    def read_at(self, name, offset, n):
        data = self.files.get(name)
        return None if data is None else data[offset:offset + n]

    def size(self, name):
        data = self.files.get(name)
        return -1 if data is None else len(data)

    def free(self):
        return self.capacity - sum(len(data) for data in self.files.values())

    def names(self, prefix, limit):
        found = []
        for name in self.files:
            if len(found) == limit:
                break
            if name.startswith(prefix):
                found.append(name)
        return found

    def write(self, name, data, atomic=True):
        if type(data) is tuple:
            data = b"".join(data)
        self._set(name, bytes(data), atomic)
        self._count(len(data))

    def append(self, name, data):
        self._set(name, self.files.get(name, b"") + bytes(data))
        self._count(len(data))

    def rename(self, src, dst):
        data = self.files.get(src)
        if data is None:
            raise OSError("no such file: %s" % src)
        self._set(dst, data)
        self._set(src, None)

    def delete(self, name):
        if name in self.files:
            self._set(name, None)

    def sent(self):
        """A message left: the operations so far happened, whatever cut() comes later."""
        self.unsent = 0

    def cut(self, k):
        """Undo the last ``k`` operations, at most those since the last sent() (and as many
        as are remembered)."""
        name = torn = None
        k = min(k, self.unsent)
        self.unsent -= k
        while k > 0 and self.journal:
            name, before, torn = self.journal.pop()
            if before is None:
                self.files.pop(name, None)
            else:
                self.files[name] = before
            k -= 1
        if torn is not None:  # the power went in the middle of this write
            self.files[name] = torn

    def _set(self, name, data, atomic=True):
        torn = None if atomic or data is None else data[:len(data) // 2]
        self.journal.append((name, self.files.get(name), torn))
        self.unsent += 1
        if len(self.journal) > JOURNAL_MAX:
            del self.journal[0]
        if data is None:
            self.files.pop(name, None)
        else:
            self.files[name] = data

    def _count(self, n):
        self.writes += 1
        self.bytes_written += n
