"""CURVE keys of a group: ``shardkeep keygen``, and loading keys for the daemon.

Files are pyzmq's certificate format (``zmq.auth.create_certificates``):
``node-<i>.key`` holds node i's public key, ``node-<i>.key_secret`` its public
and secret key.  Every daemon gets the directory of public keys
(``--curve-public-dir``) and its own secret file (``--curve-secret``).  Secret
keys belong in a secret store (a Kubernetes Secret, Vault, ...), never on a
disk every node shares: a replacement for node i is started with node i's
secret file, and whoever holds it *is* node i to the rest of the group.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import stat
import sys
import tempfile

import zmq
import zmq.auth
from zmq.utils import z85

__all__ = [
    "KEY_NAME",
    "keygen",
    "load_secret",
    "load_public_dir",
    "add_keygen_args",
    "cmd_keygen",
]

KEY_NAME = "node-{i}"
_PUBLIC_RE = re.compile(r"^node-(0|[1-9][0-9]{0,5})\.key$")
MAX_NODES = 4096
MAX_KEY_FILE_BYTES = 64 << 10


def _check_z85_key(key: bytes | None, what: str, path: str) -> bytes:
    """A CURVE key as pyzmq stores it: 40 characters of Z85 encoding 32 bytes."""
    if not key:
        raise ValueError(f"{path}: no {what} key in the file (not a pyzmq certificate?)")
    if len(key) != 40:
        raise ValueError(f"{path}: the {what} key must be 40 Z85 characters, found {len(key)}")
    try:
        raw = z85.decode(key)
    except Exception:
        raise ValueError(f"{path}: the {what} key is not valid Z85") from None
    if len(raw) != 32:
        raise ValueError(f"{path}: the {what} key does not decode to 32 bytes")
    return key


def _read_cert(path: str) -> tuple[bytes | None, bytes | None]:
    try:
        st = os.stat(path)
    except FileNotFoundError:
        raise FileNotFoundError(f"key file {path} does not exist") from None
    except PermissionError:
        raise PermissionError(f"key file {path} is not readable by this user") from None
    if not stat.S_ISREG(st.st_mode):
        raise ValueError(f"key file {path} is not a regular file")
    if st.st_size > MAX_KEY_FILE_BYTES:
        raise ValueError(f"key file {path} is {st.st_size} bytes; a pyzmq certificate is a few hundred")
    try:
        return zmq.auth.load_certificate(path)
    except PermissionError:
        raise PermissionError(f"key file {path} is not readable by this user") from None
    except (OSError, ValueError, IndexError, UnicodeError) as exc:
        raise ValueError(f"key file {path} is not a pyzmq certificate: {exc}") from None


def keygen(nodes: int, directory: str) -> list[str]:
    """Write a key pair per node into ``directory``; return the paths written.

    Creates ``directory`` with mode 0700 if it does not exist.  Public files are
    0644, secret files 0600.  Refuses (``FileExistsError``) if any of the files
    already exists: an existing group's keys are never overwritten, and nothing
    is written in that case.  ``ValueError`` for a bad node count.
    """
    if isinstance(nodes, bool) or not isinstance(nodes, int) or not 1 <= nodes <= MAX_NODES:
        raise ValueError(f"--nodes must be an integer in [1, {MAX_NODES}], got {nodes!r}")
    directory = os.path.abspath(directory)
    os.makedirs(directory, mode=0o700, exist_ok=True)
    if not os.path.isdir(directory):
        raise NotADirectoryError(f"{directory} is not a directory")
    names = [KEY_NAME.format(i=i) for i in range(nodes)]
    targets = [(n + ext) for n in names for ext in (".key", ".key_secret")]
    existing = [t for t in targets if os.path.lexists(os.path.join(directory, t))]
    if existing:
        raise FileExistsError(
            f"refusing to overwrite existing keys in {directory}: {', '.join(existing[:4])}"
            f"{' ...' if len(existing) > 4 else ''} (keys of a running group must not change; "
            "use a new directory, or remove the old files yourself)"
        )
    # Generate in a private 0700 scratch directory beside the target, fix the modes,
    # then hard-link into place: link(2) fails rather than overwrite, and a secret
    # never exists under its final name with a wider mode than 0600.
    scratch = tempfile.mkdtemp(prefix=".keygen-", dir=directory)
    written: list[str] = []
    try:
        for name in names:
            pub, sec = zmq.auth.create_certificates(scratch, name)
            os.chmod(sec, 0o600)
            os.chmod(pub, 0o644)
            for src in (pub, sec):
                dst = os.path.join(directory, os.path.basename(src))
                os.link(src, dst)
                written.append(dst)
    except BaseException:
        for path in written:
            try:
                os.unlink(path)
            except OSError:
                pass
        raise
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    return written


def load_secret(path: str) -> tuple[bytes, bytes]:
    """(public, secret) Z85 keys from a ``node-<i>.key_secret`` file.

    ``FileNotFoundError`` / ``PermissionError`` if it cannot be read, ``ValueError``
    if it is not a secret certificate (for instance a public ``.key`` file).
    """
    public, secret = _read_cert(os.fspath(path))
    if not secret:
        raise ValueError(
            f"{path} holds no secret key (pass the node's .key_secret file, not its public .key)"
        )
    return _check_z85_key(public, "public", path), _check_z85_key(secret, "secret", path)


def load_public_dir(directory: str) -> dict[int, bytes]:
    """Node index -> public Z85 key, from the ``node-<i>.key`` files in ``directory``.

    Other files (secret files, notes) are ignored.  ``FileNotFoundError`` if the
    directory does not exist, ``ValueError`` if it holds no node key, a bad key,
    or the same key for two nodes.
    """
    directory = os.fspath(directory)
    if not os.path.isdir(directory):
        raise FileNotFoundError(f"public key directory {directory} does not exist")
    keys: dict[int, bytes] = {}
    for name in sorted(os.listdir(directory)):
        m = _PUBLIC_RE.match(name)
        if not m:
            continue
        path = os.path.join(directory, name)
        public, _ = _read_cert(path)
        keys[int(m.group(1))] = _check_z85_key(public, "public", path)
    if not keys:
        raise ValueError(f"no node-<i>.key files in {directory} (write them with `shardkeep keygen`)")
    seen: dict[bytes, int] = {}
    for i, k in sorted(keys.items()):
        if k in seen:
            raise ValueError(f"{directory}: node-{seen[k]}.key and node-{i}.key hold the same key")
        seen[k] = i
    return keys


def add_keygen_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--nodes", type=int, required=True, help="number of nodes in the group")
    p.add_argument("directory", metavar="DIR", help="where to write node-<i>.key and node-<i>.key_secret")


def cmd_keygen(args: argparse.Namespace) -> int:
    try:
        paths = keygen(args.nodes, args.directory)
    except (OSError, ValueError) as exc:
        print(f"shardkeep keygen: {exc}", file=sys.stderr)
        return 1
    for p in paths:
        print(f"wrote {p}{' (secret, 0600)' if p.endswith('.key_secret') else ''}")
    d = os.path.abspath(args.directory)
    print(
        f"\nGive every daemon --curve-public-dir with the public node-<i>.key files of {d}.\n"
        "Move each node-<i>.key_secret into a secret store (Kubernetes Secret, Vault, ...) and give\n"
        "node i only its own file (--curve-secret); secret keys do not belong on shared disk.\n"
        "Keep them: a replacement for a lost node starts with that node's secret key."
    )
    return 0
