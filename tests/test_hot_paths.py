"""What a node runs per CBOR item or per message: frames off the heap, builtins as globals.

MicroPython takes a call's frame from the heap when its state (locals and value stack, a
slot each, plus 3 slots per nested exception handler) is more than 11 slots: 88 bytes on
the 64-bit Unix port, 44 on an ESP32 (py/objfun.c, VM_MAX_STATE_ON_STACK). The block is
freed on return, but it counts towards the collector's threshold like any allocation, so a
function called per item makes the node collect as if it allocated its frame every time. At
16 clients, cbor's _item, _enc and skip ran ~180 times per request per replica with heap
frames: ~30 KB counted per request, more than the replica's real allocations.

The sizes are read off the compiler's own listing (``micropython -v -v``), of the sources
as a node compiles them.
"""

from __future__ import annotations

import ast
import builtins
import re
import subprocess
from pathlib import Path

import pytest

from conftest import REPO

SLOT_BYTES = 8  # 64-bit port
STACK_FRAME_BYTES = 11 * SLOT_BYTES
EXCEPTION_HANDLER_BYTES = 3 * SLOT_BYTES

# module -> the functions that run per CBOR item, per message, per request or per page
# operation (a heap frame each: at 64 clients ~30 of them per request per replica, ~4 KB
# counted towards the next collection, went with these)
HOT = {
    "protocol/cbor.py": ["_item", "_array", "_argument", "skip", "_enc", "_head", "decode_uints"],
    "protocol/messages.py": ["decode", "_framed", "_body_of", "_check", "wire"],
    "protocol/auth.py": ["digest", "rekey", "check", "authenticator"],
    "protocol/stake.py": ["primary"],
    "protocol/replica.py": ["route", "_decoded", "receive", "on_request", "_answered",
                            "_checked_request", "_cut_batches", "_client_mac",
                            "_check_committed", "_commit_quorum"],
    "protocol/ledger.py": ["execute", "_execute3", "get", "_put"],
    "protocol/node.py": ["_note_events", "_note"],
    "protocol/cache.py": ["get", "put", "evict", "_victim", "_before"],
    "protocol/pagestore.py": ["get", "put", "delete", "_change", "_search", "_value", "_entry",
                              "_splice", "_rewrite", "_offsets", "file_at", "_read_heads",
                              "_append_heads", "_insertion_point"],
    "firmware/runtime.py": ["on_message", "sender_to_deliver", "deliver", "_copied", "drain"],
    "firmware/faults.py": ["hold"],
    "firmware/mqtt.py": ["publish", "_queue0", "_fits0", "_put_publish", "_put_str",
                         "_put_bytes", "_put_varint", "_packet_size", "_dispatch",
                         "_on_publish"],
    "firmware/store.py": ["read_into", "_opened", "_file_size", "_read_all", "_cut", "_put",
                          "_write_to", "write"],
}

_LISTING = re.compile(r"code block '([^']+)'.*?\(N_STATE (\d+)\)\s*\(N_EXC_STACK (\d+)\)",
                      re.S)


def frame_bytes(micropython: Path, source: Path) -> dict[str, list[int]]:
    """Each function of ``source`` -> the state bytes of its frame (one per definition)."""
    done = subprocess.run([str(micropython), "-v", "-v", "-c",
                           f"compile(open({str(source)!r}).read(), 'm', 'exec')"],
                          capture_output=True, text=True, timeout=60, check=True)
    out: dict[str, list[int]] = {}
    for name, state, handlers in _LISTING.findall(done.stdout):
        out.setdefault(name, []).append(
            int(state) * SLOT_BYTES + int(handlers) * EXCEPTION_HANDLER_BYTES)
    return out


@pytest.mark.parametrize("module", sorted(HOT))
def test_hot_functions_keep_their_frames_on_the_c_stack(micropython, module):
    sizes = frame_bytes(micropython, REPO / module)
    for name in HOT[module]:
        assert name in sizes, f"{module}: no function {name}"
        assert max(sizes[name]) <= STACK_FRAME_BYTES, (
            f"{module}:{name} needs a {max(sizes[name])}-byte frame: a heap frame per call")


def test_the_listing_shows_a_frame_that_goes_to_the_heap(micropython):
    # The reader itself: a function known to need more (a loop's iterator takes 4 slots, a
    # handler 3) is read as over the bound, so the test above can fail.
    sizes = frame_bytes(micropython, REPO / "protocol/cbor.py")
    assert max(sizes["_map"]) > STACK_FRAME_BYTES
    assert max(sizes["_text"]) == 8 * SLOT_BYTES + EXCEPTION_HANDLER_BYTES


# The modules a node runs per message; each binds the builtins it uses as globals (cbor.py's
# header: a name missing from a module's globals probes its table before the builtins).
NODE_MODULES = [
    "protocol/auth.py", "protocol/cache.py", "protocol/cbor.py", "protocol/detector.py",
    "protocol/fetch.py", "protocol/flash.py", "protocol/ledger.py", "protocol/log.py",
    "protocol/messages.py", "protocol/node.py", "protocol/pagestore.py", "protocol/replica.py",
    "protocol/spill.py", "protocol/stake.py", "protocol/state.py", "protocol/transfer.py",
    "protocol/viewchange.py", "firmware/faults.py", "firmware/mqtt.py", "firmware/runtime.py",
    "firmware/store.py",
]
# Builtins a node calls only at start-up, to log or on an error path: left to the builtins.
RARE = {"print", "open", "classmethod", "property", "repr", "callable", "eval"}
BUILTINS = set(dir(builtins))


def unbound_builtins(source: str) -> set[str]:
    """The builtin functions and types ``source`` uses without binding them as globals
    (exception classes and RARE aside)."""
    tree = ast.parse(source)
    bound: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            bound.add(node.name)
        elif isinstance(node, ast.Name) and isinstance(node.ctx, ast.Store):
            bound.add(node.id)
        elif isinstance(node, ast.alias):
            bound.add(node.asname or node.name.split(".")[0])
    return {node.id for node in ast.walk(tree)
            if isinstance(node, ast.Name) and isinstance(node.ctx, ast.Load)
            and node.id in BUILTINS and node.id not in bound and node.id not in RARE
            and not (isinstance(getattr(builtins, node.id), type)
                     and issubclass(getattr(builtins, node.id), BaseException))}



@pytest.mark.parametrize("module", NODE_MODULES)
def test_node_modules_bind_the_builtins_they_use(module):
    assert unbound_builtins((REPO / module).read_text()) == set()


def test_a_builtin_left_unbound_is_found():
    assert unbound_builtins("def f(x):\n    return len(x) + int(x)\n") == {"len", "int"}
    assert unbound_builtins("from builtins import len\n\ndef f(x):\n    return len(x)\n") == set()
