"""A real full disk and a real read-only one, on the small filesystem of conftest's small_disk fixture."""

import errno
import os
import subprocess


def fill(folder):
    """Fill the filesystem of `folder` to its last byte (a file that grows until the write is refused)."""
    fd = os.open(os.path.join(folder, "filler"), os.O_WRONLY | os.O_CREAT)
    try:
        for chunk in (65536, 4096, 512, 1):
            while True:
                try:
                    os.write(fd, b"x" * chunk)
                except OSError as e:
                    assert e.errno == errno.ENOSPC, e
                    break
    finally:
        os.close(fd)


def remount_read_only(folder):
    subprocess.run(["mount", "-o", "remount,ro", str(folder)], check=True)
