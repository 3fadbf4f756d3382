"""Byte counts of an address's forms in files; SQLite's own files read in a child process.

A process that holds SQLite connections to a database must not open and close that
database's files itself: POSIX advisory locks belong to the process, and closing *any*
descriptor of a file drops every lock the process holds on it, its SQLite connections'
included ("How To Corrupt An SQLite Database File", §2.2, sqlite.org/howtocorrupt.html).
Another process then takes this one's connections for gone: measured here, a second
process's commit after ``erasure check`` had read the files in a process with open
connections left those connections reading a database whose indexes had the wrong number of
entries (``database disk image is malformed``) until they were closed; the file itself was
sound. So :func:`scan_apart` reads them in a child process (``python -m
service.erasure.scan``), whose closes drop only its own (no) locks; the forms go through its
stdin, never its command line (an address is not for ``ps``).
"""

from __future__ import annotations

import asyncio
import json
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path

CHUNK = 1 << 20


def scan_file(path: Path, forms: Mapping[str, bytes], chunk_size: int = CHUNK) -> dict[str, int]:
    """Occurrences of each form in a file, read ``chunk_size`` bytes at a time (a match
    across chunks counts); forms that do not occur are left out. Raises OSError."""
    overlap = max(len(n) for n in forms.values()) - 1
    counts: dict[str, int] = {}
    tail = b""
    with path.open("rb") as handle:
        while chunk := handle.read(chunk_size):
            data = tail + chunk
            # Count only matches that end inside the new chunk, so none is counted twice.
            for name, needle in forms.items():
                n = data.count(needle) - tail.count(needle)
                if n:
                    counts[name] = counts.get(name, 0) + n
            tail = data[-overlap:] if overlap > 0 else b""
    return counts


async def scan_apart(
    paths: Sequence[Path], forms: Mapping[str, bytes]
) -> dict[Path, dict[str, int] | OSError]:
    """:func:`scan_file` of each path in a child process (see the module): per path its
    counts, or the OSError that reading it raised. Raises RuntimeError if the child fails."""
    request = {"files": [str(p) for p in paths], "forms": {k: v.hex() for k, v in forms.items()}}
    child = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "service.erasure.scan",
        stdin=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await child.communicate(json.dumps(request).encode())
    if child.returncode != 0:
        raise RuntimeError(f"the file scan failed: {err.decode(errors='replace')[-500:]}")
    answers = json.loads(out)
    result: dict[Path, dict[str, int] | OSError] = {}
    for path in paths:
        answer = answers[str(path)]
        result[path] = OSError(answer["errno"], answer["error"]) if "error" in answer else answer
    return result


def main() -> None:
    """The child: a JSON request on stdin, a JSON answer (per file, counts or an error) on
    stdout."""
    request = json.load(sys.stdin)
    forms = {k: bytes.fromhex(v) for k, v in request["forms"].items()}
    answers: dict[str, object] = {}
    for name in request["files"]:
        try:
            answers[name] = scan_file(Path(name), forms)
        except OSError as exc:
            answers[name] = {"errno": exc.errno or 0, "error": exc.strerror or str(exc)}
    sys.stdout.write(json.dumps(answers))


if __name__ == "__main__":
    main()
