"""Mount the mirror file system over a replicated directory, and take it down again.

Why it exists: the mount's lifecycle is where data silently escapes replication if it goes
wrong (an app writing to the bare directory after the mount vanished, a stale mount after a
crash), so it lives in one small place. `MirrorMount.start()` opens the directory (O_PATH) first,
then mounts over the same path, so the app keeps its paths and the file system still reaches the
files underneath; the libfuse loop runs in a thread of the agent. If the agent dies, the mount
dies with it and the app gets ENOTCONN: that fences its writes. `cleanup_stale()` removes such a
dead mount when the agent restarts.

The loop is driven through libfuse3 directly (fuse_new / fuse_mount / fuse_loop_mt) rather than
fuse_main: fuse_main would install SIGTERM/SIGHUP/SIGINT handlers that end the *loop* instead of
the agent, after which the app would write to the bare directory unreplicated. mfusepy supplies
the ctypes structures and the per-callback adaptors.
"""

from __future__ import annotations

import ctypes
import errno
import functools
import logging
import os
import threading
import time
from typing import Any

import mfusepy  # type: ignore[import-untyped]

from hvha.replication import express
from hvha.replication import ops as o
from hvha.replication.exclude import Excludes
from hvha.replication.express import Express
from hvha.replication.localfault import FaultLatch
from hvha.replication.mirrordata import ReplicationSink
from hvha.replication.mirrorfs import MirrorFS
from hvha.replication.mirrorrules import op_path

log = logging.getLogger(__name__)

MNT_DETACH = 2
FUSE_CAP_WRITEBACK_CACHE = 1 << 16
FUSE_CAP_DONT_MASK = 1 << 6
FUSE_CAP_POSIX_ACL = 1 << 19
_libc = ctypes.CDLL(None, use_errno=True)
_libc.umount2.argtypes = [ctypes.c_char_p, ctypes.c_int]
_lib = mfusepy._libfuse


class _FuseArgs(ctypes.Structure):
    _fields_ = [("argc", ctypes.c_int), ("argv", ctypes.POINTER(ctypes.c_char_p)),
                ("allocated", ctypes.c_int)]


_lib.fuse_new_31.restype = ctypes.c_void_p
_lib.fuse_new_31.argtypes = [ctypes.POINTER(_FuseArgs), ctypes.c_void_p, ctypes.c_size_t,
                             ctypes.c_void_p]
_lib.fuse_mount.argtypes = [ctypes.c_void_p, ctypes.c_char_p]
_lib.fuse_loop_cfg_create.restype = ctypes.c_void_p
_lib.fuse_loop_cfg_set_max_threads.argtypes = [ctypes.c_void_p, ctypes.c_uint]
_lib.fuse_loop_cfg_set_idle_threads.argtypes = [ctypes.c_void_p, ctypes.c_uint]
_lib.fuse_loop_cfg_destroy.argtypes = [ctypes.c_void_p]
_lib.fuse_loop_mt_312.argtypes = [ctypes.c_void_p, ctypes.c_void_p]
for _fn in ("fuse_unmount", "fuse_destroy", "fuse_exit"):
    getattr(_lib, _fn).argtypes = [ctypes.c_void_p]

# FUSE callbacks whose handler in MirrorFS has another name.
_HANDLER_NAMES = {"utimens": "utimens_raw"}


_pythonapi = ctypes.pythonapi
_pythonapi.PyGILState_Ensure.restype = ctypes.c_int
_pythonapi.PyGILState_Ensure.argtypes = []
_pythonapi.PyThreadState_Get.restype = ctypes.c_void_p
_pythonapi.PyThreadState_Get.argtypes = []
for _fn in ("PyThreadState_Clear", "PyThreadState_Delete"):
    getattr(_pythonapi, _fn).argtypes = [ctypes.c_void_p]
    getattr(_pythonapi, _fn).restype = None


def _dec(path: bytes | None) -> str | None:
    return None if path is None else path.decode("utf-8", "surrogateescape")


def _str(path: bytes) -> str:
    return path.decode("utf-8", "surrogateescape")


class _Adaptor(mfusepy.FUSE):  # type: ignore[misc]
    """mfusepy's callback adaptors, without fuse_main, plus the ones mfusepy drops arguments of
    (rename flags, truncate's file handle, raw utimens times) or lacks (lseek, copy_file_range)."""

    def __init__(self, operations: MirrorFS) -> None:
        self.operations, self.raw_fi, self.use_ns = operations, True, True
        self.encoding, self.errors = "utf-8", "surrogateescape"
        self._FUSE__critical_exception = None
        self._libfuse2_options_moved_into_libfuse3_config: dict[str, Any] = {}
        self._worker = threading.local()  # .pinned: this libfuse worker keeps its state
        self._pinned: list[int] = []  # the kept PyThreadState pointers (_pin_thread_state)
        self.table = mfusepy.fuse_operations()
        self.callbacks: dict[str, Any] = {}  # the table only points at them: keep them alive
        for field in mfusepy.fuse_operations._fields_:
            name, proto = field[0], field[1]
            if not hasattr(proto, "argtypes"):
                continue
            handler = getattr(operations, _HANDLER_NAMES.get(name, name), None)
            if name != "init" and (handler is None or getattr(handler, "libfuse_ignore", False)):
                continue
            method = getattr(self, name + "_fuse_3", None) or getattr(self, name)
            cb = self.callbacks[name] = proto(functools.partial(self._wrapper, method))
            setattr(self.table, name, cb)

    def _wrapper(self, func: Any, *args: Any, **kwargs: Any) -> Any:
        if not getattr(self._worker, "pinned", False):
            self._pin_thread_state()
        return super()._wrapper(func, *args, **kwargs)

    def _pin_thread_state(self) -> None:
        """Keep the calling libfuse worker's Python thread state between requests.

        ctypes runs each callback from a thread Python did not start under PyGILState_Ensure
        and PyGILState_Release: left alone, every FUSE request creates a thread state and
        deletes it on return, and with it a frame stack chunk mapped and unmapped each time
        (an mmap and a munmap per request; a munmap in a threaded process interrupts the
        other CPUs to flush their TLBs). One more Ensure, never released, keeps the state for
        the worker's lifetime: the loop keeps its workers (idle threads = max threads), and
        `release_thread_states` deletes the states once the loop has joined them."""
        self._worker.pinned = True
        if any(t.ident == threading.get_ident() for t in threading.enumerate()):
            return  # a thread Python started keeps its state anyway
        _pythonapi.PyGILState_Ensure()
        self._pinned.append(_pythonapi.PyThreadState_Get())

    def release_thread_states(self) -> None:
        """Delete the pinned states; only once the loop returned (its workers are joined)."""
        pinned, self._pinned = self._pinned, []
        for tstate in pinned:
            _pythonapi.PyThreadState_Clear(tstate)
            _pythonapi.PyThreadState_Delete(tstate)

    def rename_fuse_3(self, old: bytes, new: bytes, flags: int) -> int:
        return self.operations.rename(_str(old), _str(new), flags)

    def truncate_fuse_3(self, path: bytes | None, length: int, fip: Any) -> int:
        return self.operations.truncate(_dec(path), length, fip.contents if fip else None)

    def utimens_fuse_3(self, path: bytes, buf: Any, fip: Any) -> int:
        return self.operations.utimens_raw(_str(path), ctypes.cast(buf, ctypes.c_void_p).value)

    def lseek(self, path: bytes | None, off: int, whence: int, fip: Any) -> int:
        return self.operations.lseek(_dec(path), off, whence, fip.contents)

    def copy_file_range(self, path_in: bytes | None, fi_in: Any, off_in: int,
                        path_out: bytes | None, fi_out: Any, off_out: int, size: int,
                        flags: int) -> int:
        return self.operations.copy_file_range(_dec(path_in), fi_in.contents, off_in,
                                               _dec(path_out), fi_out.contents, off_out, size,
                                               flags)

    def init_fuse_3(self, conn: Any, config: Any) -> None:
        if conn:  # write() must return only after the secondary has the data: no writeback
            conn.contents.want &= ~FUSE_CAP_WRITEBACK_CACHE
            # POSIX ACLs as on the backing file system: the kernel enforces them, and passes
            # the caller's mode unmasked with its umask (mirrorfs.py `_requested` applies it,
            # or the parent's default ACL decides)
            conn.contents.want |= conn.contents.capable & (FUSE_CAP_POSIX_ACL
                                                           | FUSE_CAP_DONT_MASK)
        if config:  # st_ino from the backing fs (hard links share it); no .fuse_hidden files
            config.contents.use_ino = 1
            config.contents.hard_remove = 1


def unescape_mountinfo(field: str) -> str:
    """A mountinfo field with its octal escapes (\\040 for a space...) decoded."""
    return field.encode().decode("unicode_escape").encode("latin-1").decode(
        "utf-8", "surrogateescape")


def parse_mountinfo(text: str) -> list[tuple[str, str]]:
    """(mount point, fs type) of every line of /proc/self/mountinfo, in mount order."""
    out = []
    for line in text.splitlines():
        left, _, right = line.partition(" - ")
        fields = left.split()
        if len(fields) >= 5 and right:
            out.append((unescape_mountinfo(fields[4]), right.split()[0]))
    return out


def is_mounted(path: str) -> bool:
    """True if a FUSE file system is mounted at `path` (live or dead)."""
    real = os.path.realpath(path)
    with open("/proc/self/mountinfo") as f:
        return any(mp == real and fs.startswith("fuse") for mp, fs in parse_mountinfo(f.read()))


def _umount(path: str, flags: int) -> int:
    """umount2(2); returns 0 or the errno."""
    if _libc.umount2(os.fsencode(path), flags) == 0:
        return 0
    return ctypes.get_errno()


def cleanup_stale(path: str) -> bool:
    """Lazily unmount dead FUSE mounts (ENOTCONN) at `path`, e.g. left by a crashed agent.
    Returns True if it removed any. A live mount is left alone."""
    removed = False
    while is_mounted(path):
        try:
            os.statvfs(path)  # always asks the server (stat may be answered from the cache)
            return removed
        except OSError as e:
            if e.errno != errno.ENOTCONN:
                raise
        err = _umount(path, MNT_DETACH)
        if err:
            raise OSError(err, f"cannot unmount the dead mirror mount at {path}: "
                               f"{os.strerror(err)}; try `umount -l {path}` as root")
        log.warning("removed a dead mirror mount at %s (left by a crashed agent)", path)
        removed = True
    return removed


class MirrorMount:
    """A MirrorFS mounted over `path`, served by a libfuse thread pool inside this process."""

    def __init__(self, path: str, sink: ReplicationSink, *, max_threads: int = 16,
                 sync_on_close: bool = False, mount_timeout: float = 10.0,
                 excludes: Excludes | None = None, faults: FaultLatch | None = None) -> None:
        self.path = os.path.realpath(path)
        self.excludes = excludes
        self.faults = faults  # the directory's latch: it outlives the mount (see localfault)
        self.sink = sink
        self.max_threads = max_threads
        self.sync_on_close = sync_on_close
        self.mount_timeout = mount_timeout
        self.root_fd: int | None = None
        self._fuse: int | None = None
        self._adaptor: _Adaptor | None = None
        self._thread: threading.Thread | None = None
        self._conn: int | None = None
        self._express: Express | None = None

    def _install_express(self, fs: MirrorFS, adaptor: _Adaptor) -> Express | None:
        """Serve small writes and fsyncs in C (express.py) if this mount and stream can."""
        ok, why = express.available()
        attach = getattr(self.sink, "attach_express", None)
        if not ok or attach is None or fs.excludes:
            log.debug("mirror %s: no express path (%s)", self.path,
                      why or ("exclude patterns" if fs.excludes else "sink without one"))
            return None
        sink: Any = self.sink

        def wait(seq: int) -> int:
            try:
                fs._wait(seq)
            except OSError as e:
                return e.errno or errno.EIO
            return 0

        def fault(path: str, datasync: bool, err: int) -> None:
            fs.faults.note("fdatasync" if datasync else "fsync", op_path(path),
                           OSError(err, os.strerror(err)))

        def diverged(path: str, off: int, length: int, seq: int, n: int, err: int) -> int:
            """A large write sent by C failed or fell short here: as DataPath._write_early."""
            name = op_path(path)
            if n < 0:
                fs.faults.note("write", path, OSError(err, os.strerror(err)))
            sink.express_take()  # the op is in the stream's books now
            why = os.strerror(err) if n < 0 else f"short write: {n} of {length} bytes"
            try:
                fs.diverged_write(o.Write(name, off, bytes(length)), seq, why)
            except OSError as e:
                return e.errno or errno.EIO
            return 0

        x = Express(adaptor.table, adaptor.callbacks, mfusepy.fuse_file_info.fh.offset,
                    ctypes.cast(_lib.fuse_get_context, ctypes.c_void_p).value or 0,
                    wait=wait, handover=sink.express_take,
                    alive=lambda: sink.peer_alive is None or bool(sink.peer_alive()),
                    fault=fault, allowed=lambda: not fs.faults.errno,
                    diverged=diverged if hasattr(sink, "diverged") else None)
        fs.express, fs.lend = x, sink.express_try_on
        fs.faults.listeners.append(x.fault)
        attach(x)
        return x

    def _drop_express(self) -> None:
        x, self._express = self._express, None
        if x is None:
            return
        detach = getattr(self.sink, "attach_express", None)
        if detach is not None:
            detach(None)  # takes the path back first
        x.free()

    def start(self) -> None:
        """Open the directory, mount over it and return once the mount is live."""
        if os.geteuid() != 0 or not os.path.exists("/dev/fuse"):
            raise PermissionError(f"mounting the mirror at {self.path} needs root and /dev/fuse "
                                  "(modprobe fuse; apt-get install fuse3)")
        cleanup_stale(self.path)
        if is_mounted(self.path):
            raise RuntimeError(f"{self.path} already has a live FUSE mount; stop the agent that "
                               "owns it (or `umount {self.path}`) first")
        self.root_fd = os.open(self.path, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            fs = MirrorFS(self.root_fd, self.sink, sync_on_close=self.sync_on_close,
                          excludes=self.excludes, faults=self.faults)
            self._adaptor = _Adaptor(fs)
            self._express = self._install_express(fs, self._adaptor)
            opts = ("allow_other,default_permissions,subtype=hvha,"
                    f"fsname=hvha:{self.path.replace(',', '_')}")
            argv = [b"hvha-mirror", b"-o", os.fsencode(opts)]
            args = _FuseArgs(len(argv), (ctypes.c_char_p * len(argv))(*argv), 0)
            table = self._adaptor.table
            self._fuse = _lib.fuse_new_31(ctypes.byref(args), ctypes.byref(table),
                                          ctypes.sizeof(table), None)
            if not self._fuse:
                raise RuntimeError(f"fuse_new failed for {self.path} (see stderr)")
            if self._express is not None:
                self._express.bind(self._fuse, self.root_fd)
            if _lib.fuse_mount(self._fuse, os.fsencode(self.path)) != 0:
                _lib.fuse_destroy(self._fuse)
                self._fuse = None
                raise RuntimeError(f"mounting the mirror over {self.path} failed (see stderr): "
                                   "is /dev/fuse usable and the path a directory?")
            self._thread = threading.Thread(target=self._loop, name=f"mirrorfs:{self.path}",
                                            daemon=True)
            self._thread.start()
            self._wait_live()
        except BaseException:
            self.stop()
            raise

    def _wait_live(self) -> None:
        deadline = time.monotonic() + self.mount_timeout
        while not is_mounted(self.path):
            if time.monotonic() > deadline:
                raise TimeoutError(f"the mirror mount at {self.path} did not appear within "
                                   f"{self.mount_timeout} s")
            time.sleep(0.01)
        self._conn = os.minor(os.stat(self.path).st_dev)

    def _loop(self) -> None:
        fuse = self._fuse  # the loop owns the handle: stop() may give up waiting and drop it
        cfg = _lib.fuse_loop_cfg_create()
        _lib.fuse_loop_cfg_set_max_threads(cfg, self.max_threads)
        _lib.fuse_loop_cfg_set_idle_threads(cfg, self.max_threads)  # _Adaptor._pin_thread_state
        try:
            rc = _lib.fuse_loop_mt_312(fuse, cfg)
            if rc:
                log.error("the mirror loop for %s ended with %d", self.path, rc)
        finally:
            _lib.fuse_loop_cfg_destroy(cfg)
            _lib.fuse_unmount(fuse)  # no-op when the kernel connection is already gone
            _lib.fuse_destroy(fuse)
            if self._express is not None:  # no handler runs any more
                self._drop_express()
            if self._adaptor is not None:  # the loop joined its workers before returning
                self._adaptor.release_thread_states()
                self._adaptor.operations.direct.close()  # handles the kernel never released

    def stop(self, timeout: float = 10.0) -> None:
        """Unmount (lazily if busy), end the loop and release the directory descriptor."""
        ran = self._thread is not None  # then the loop drops the express path when it ends
        if self._thread is not None:
            err = _umount(self.path, 0) if is_mounted(self.path) else 0
            if err == errno.EBUSY:
                log.warning("mirror mount %s is busy; detaching it lazily", self.path)
                err = _umount(self.path, MNT_DETACH)
                self._abort_connection()
            if err and err != errno.EINVAL:
                log.error("unmounting %s failed: %s", self.path, os.strerror(err))
            self._thread.join(timeout)
            if self._thread.is_alive():  # it destroys its handle itself when it ends
                log.error("the mirror loop for %s did not stop within %.0f s", self.path, timeout)
            self._thread = None
        elif self._fuse is not None:
            _lib.fuse_unmount(self._fuse)
            _lib.fuse_destroy(self._fuse)
        if not ran:
            self._drop_express()
        self._fuse = None
        if self.root_fd is not None:
            os.close(self.root_fd)
            self.root_fd = None

    def _abort_connection(self) -> None:
        abort = f"/sys/fs/fuse/connections/{self._conn}/abort"
        if self._conn is not None and os.path.exists(abort):
            with open(abort, "w") as f:
                f.write("1")

    def __enter__(self) -> MirrorMount:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()
