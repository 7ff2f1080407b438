"""ddpm.allocator: freed blocks stay in the process, so the next step reuses pages it already touched."""

import subprocess
import sys
import textwrap

import pytest

import ddpm.allocator
from ddpm import cli

# A child process frees a 20 MiB tensor and reports glibc's mallinfo2: bytes in mmapped blocks while
# the tensor lived, and free bytes left in the heap after it was freed.
_CHILD = textwrap.dedent("""
    import ctypes, sys, torch
    from ddpm.allocator import keep_freed_memory
    applied = keep_freed_memory() if sys.argv[1] == "tuned" else None
    class Mallinfo2(ctypes.Structure):
        _fields_ = [(n, ctypes.c_size_t) for n in
                    "arena ordblks smblks hblks hblkhd usmblks fsmblks uordblks fordblks keepcost".split()]
    libc = ctypes.CDLL(None)
    libc.mallinfo2.restype = Mallinfo2
    x = torch.ones(5 * 2**20)
    alive = libc.mallinfo2().hblkhd
    del x
    print(applied, alive, libc.mallinfo2().fordblks)
""")


def _child(mode: str) -> tuple[str, int, int]:
    out = subprocess.run([sys.executable, "-c", _CHILD, mode], capture_output=True, text=True, check=True)
    applied, mmapped, free_heap = out.stdout.split()
    return applied, int(mmapped), int(free_heap)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's malloc only")
def test_freed_block_stays_in_the_heap():
    size = 20 * 2**20
    _, mmapped, free_heap = _child("default")
    assert mmapped >= size and free_heap < size  # default glibc: its own mmap, unmapped when freed
    applied, mmapped, free_heap = _child("tuned")
    assert applied == "True"
    assert mmapped < size and free_heap >= size  # tuned: served from the heap and kept there


def test_the_command_sets_it_up_once(monkeypatch, capsys):
    calls = []
    monkeypatch.setattr(ddpm.allocator, "keep_freed_memory", lambda: calls.append(1) or True)
    assert cli.main(["presets"]) == 0
    assert calls == [1]
