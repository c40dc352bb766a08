"""A real Slurm cluster on this one machine, for tests: slurmctld + one slurmd per emulated node.

Usage (see tests/test_slurm.py for the pytest fixture)::

    from tests.slurm_cluster import SlurmCluster, slurm_available

    with SlurmCluster(tmp_path / "slurm") as cluster:        # installs (apt) if missing, starts, waits
        job = cluster.sbatch("slurm/pretrain_expand.sh", ["--foo"],
                             env={"TP": "1"}, sbatch_args=["--nodes=2", "--gpus-per-node=0"])
        state = cluster.wait(job, timeout=120)                # "COMPLETED", "FAILED", ...
        info = cluster.job_info(job)                          # dict from `scontrol show job`
        subprocess.run(["srun", "-N2", "hostname"], env=cluster.env)

What it does (the recipe in /work/shared/docs/PLATFORM.md, "Slurm on one machine"):
- Debian packages slurmctld, slurmd, slurm-client, libpmix2, openmpi-bin, libopenmpi-dev are
  apt-installed when a binary is missing (root + apt-get needed; `slurm_available()` says whether
  that is possible here).
- One slurm.conf under the scratch dir: auth/none, cred/none, no accounting, cons_tres, every state,
  spool, log, pid and tmp path under the scratch dir, free TCP ports picked at start, nodes
  n1..nK all at 127.0.0.1 on their own slurmd ports (MULTIPLE_SLURMD).
- Each slurmd runs under `unshare --mount --uts` with a private hosts file bind-mounted over
  /etc/hosts and its hostname set to its node name, so `hostname` and
  `scontrol show hostnames $SLURM_JOB_NODELIST` work inside jobs. Where unshare is not permitted,
  "127.0.0.1 n1 n2" is appended to /etc/hosts instead (and hostname is the host's).
- `stop()` cancels this cluster's jobs, then ends exactly the daemons it started (by PID) and any
  process left in their private namespaces (job steps), never anything else.
Jobs' states are read with `squeue` / `scontrol show job` (no accounting; jobs stay visible for
MinJobAge=300 s after they end).
"""

from __future__ import annotations

import atexit
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Iterable, Mapping, Sequence

APT_PACKAGES = ("slurmctld", "slurmd", "slurm-client", "libpmix2", "openmpi-bin", "libopenmpi-dev")
REQUIRED_BINARIES = ("slurmctld", "slurmd", "sbatch", "srun", "squeue", "scontrol", "sinfo", "scancel")

# States after which a job will not run again by itself (a requeued job passes through
# REQUEUED/PENDING and is not final).
FINAL_STATES = frozenset({
    "COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "PREEMPTED", "OUT_OF_MEMORY",
    "BOOT_FAIL", "DEADLINE", "REVOKED", "SPECIAL_EXIT", "REQUEUE_HOLD",
})


class SlurmError(RuntimeError):
    pass


def _binaries_present() -> bool:
    return all(shutil.which(b) for b in REQUIRED_BINARIES)


def _libpmix_present() -> bool:
    dirs = ("/usr/lib/x86_64-linux-gnu", "/usr/lib/aarch64-linux-gnu", "/usr/lib64", "/usr/lib")
    return any(any(Path(d).glob("libpmix.so*")) for d in dirs if Path(d).is_dir())


def _missing_packages() -> list[str]:
    """Debian packages of APT_PACKAGES that are not installed (dpkg's view)."""
    if _binaries_present() and shutil.which("mpirun") and _libpmix_present():
        return []   # everything is there, however it was installed
    if not shutil.which("dpkg-query"):
        return [] if _binaries_present() else list(APT_PACKAGES)
    missing = []
    for pkg in APT_PACKAGES:
        r = subprocess.run(["dpkg-query", "-W", "-f=${Status}", pkg], capture_output=True, text=True)
        if r.returncode != 0 or "install ok installed" not in r.stdout:
            missing.append(pkg)
    return missing


def slurm_available() -> bool:
    """True when a Slurm cluster can be run here: the daemons are installed, or they can be
    installed (root with apt-get on a Linux machine)."""
    if not sys.platform.startswith("linux"):
        return False
    if _binaries_present():
        return os.geteuid() == 0 or bool(os.environ.get("SLURM_TEST_ALLOW_NONROOT"))
    return os.geteuid() == 0 and shutil.which("apt-get") is not None


def ensure_installed(timeout: float = 900) -> None:
    """apt-get install the Slurm + PMIx + Open MPI packages that are missing (`apt-get update` first)."""
    missing = _missing_packages()
    if not missing:
        return
    if os.geteuid() != 0 or not shutil.which("apt-get"):
        raise SlurmError(f"Slurm packages missing ({' '.join(missing)}) and cannot apt-get install them here")
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    lock = ["-o", "DPkg::Lock::Timeout=300"]
    steps = [["apt-get", *lock, "update", "-qq"],
             ["apt-get", *lock, "install", "-y", "-qq", "--no-install-recommends", *missing]]
    for cmd in steps:
        r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)
        if r.returncode != 0:
            raise SlurmError(f"{' '.join(cmd)} failed ({r.returncode}):\n{(r.stdout + r.stderr)[-3000:]}")
    if not _binaries_present():
        raise SlurmError(f"installed {' '.join(missing)} but Slurm binaries are still missing")


def ensure_mpi4py(python: str = sys.executable, timeout: float = 300) -> None:
    """pip install mpi4py (the `mpi` extra) into `python`'s environment when it is missing."""
    ok = subprocess.run([python, "-c", "import mpi4py"], capture_output=True).returncode == 0
    if ok:
        return
    r = subprocess.run([python, "-m", "pip", "install", "-q", "mpi4py"], capture_output=True, text=True,
                       timeout=timeout)
    if r.returncode != 0:
        raise SlurmError(f"pip install mpi4py failed:\n{(r.stdout + r.stderr)[-3000:]}")


def _free_ports(n: int) -> list[int]:
    socks, ports = [], []
    try:
        for _ in range(n):
            s = socket.socket()
            s.bind(("127.0.0.1", 0))
            socks.append(s)
            ports.append(s.getsockname()[1])
    finally:
        for s in socks:
            s.close()
    return ports


def _unshare_works() -> bool:
    if not shutil.which("unshare"):
        return False
    try:
        r = subprocess.run(["unshare", "--mount", "--uts", "sh", "-c",
                            "hostname slurmtest-probe && mount --bind /dev/null /dev/null"],
                           capture_output=True, timeout=20)
    except (OSError, subprocess.TimeoutExpired):
        return False
    return r.returncode == 0


def _die_with_parent() -> None:
    """preexec_fn: the daemon gets SIGTERM when the process that started it dies, even by SIGKILL
    or os._exit (e.g. a pytest-timeout in thread mode), so no daemon outlives its test run."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM, 0, 0, 0)  # PR_SET_PDEATHSIG
    except OSError:
        pass


def _tail(path: Path, n: int = 40) -> str:
    try:
        lines = path.read_text(errors="replace").splitlines()
    except OSError as exc:
        return f"({path}: {exc})"
    return "\n".join(lines[-n:])


def _parse_scontrol(text: str) -> dict[str, str]:
    """`scontrol show job -o` output -> {Key: value}. Values may contain spaces only in a few
    fields (Command=, WorkDir=, ...): a token without '=' is glued to the previous value."""
    info: dict[str, str] = {}
    last = None
    for tok in text.strip().split():
        key, sep, val = tok.partition("=")
        if sep and key and (key[0].isupper() or key in ("nodelist",)):
            info[key] = val
            last = key
        elif last is not None:
            info[last] += " " + tok
    return info


class SlurmCluster:
    """slurmctld + len(nodes) slurmd on this host; see the module docstring."""

    def __init__(self, scratch_dir: str | os.PathLike, nodes: Sequence[str] = ("n1", "n2"),
                 cpus_per_node: int = 2, real_memory_mb: int = 8000, install: bool = True,
                 start_timeout: float = 60.0):
        self.scratch = Path(scratch_dir).resolve()
        self.nodes = tuple(nodes)
        self.cpus_per_node = cpus_per_node
        self.real_memory_mb = real_memory_mb
        self.install = install
        self.start_timeout = start_timeout
        self.conf_path = self.scratch / "etc" / "slurm.conf"
        self.log_dir = self.scratch / "log"
        self._procs: dict[str, subprocess.Popen] = {}   # "slurmctld" / node name -> daemon
        self._namespaces: set[str] = set()               # uts namespaces of our slurmds
        self._use_unshare = False
        self._started = False
        self.env: dict[str, str] = {}

    # ------------------------------------------------------------------ lifecycle
    def __enter__(self) -> "SlurmCluster":
        self.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    def start(self) -> "SlurmCluster":
        if self._started:
            return self
        if self.install:
            ensure_installed()
        elif not _binaries_present():
            raise SlurmError("Slurm binaries missing")
        for sub in ("etc", "state", "spool", "log", "run", "nodetmp"):
            (self.scratch / sub).mkdir(parents=True, exist_ok=True)
        for node in self.nodes:
            (self.scratch / "spool" / node).mkdir(parents=True, exist_ok=True)
            (self.scratch / "nodetmp" / node).mkdir(parents=True, exist_ok=True)
        self._use_unshare = _unshare_works()
        if not self._use_unshare:
            self._append_etc_hosts()
        ports = _free_ports(1 + len(self.nodes))
        self.ctld_port, self.node_ports = ports[0], ports[1:]
        self._write_conf()

        env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "SBATCH_", "SRUN_", "SALLOC_"))}
        env["SLURM_CONF"] = str(self.conf_path)
        self.env = env
        self._started = True
        atexit.register(self.stop)      # daemons never outlive the test process
        try:
            self._start_daemons()
            self._wait_ready()
        except BaseException:
            self.stop()
            raise
        return self

    def stop(self) -> None:
        """Cancel our jobs, end our daemons (by PID) and whatever is left in their namespaces."""
        if not self._started:
            return
        self._started = False
        alive = any(p.poll() is None for p in self._procs.values())
        if alive and self._procs.get("slurmctld") and self._procs["slurmctld"].poll() is None:
            try:
                subprocess.run(["scancel", "--full", "--user", str(os.geteuid())], env=self.env,
                               capture_output=True, timeout=15)
                deadline = time.monotonic() + 10
                while time.monotonic() < deadline:
                    out = subprocess.run(["squeue", "-h", "-o", "%i"], env=self.env, capture_output=True,
                                         text=True, timeout=15).stdout.strip()
                    if not out:
                        break
                    time.sleep(0.3)
            except (OSError, subprocess.SubprocessError):
                pass
        # slurmds first (they own the job steps), slurmctld last.
        order = [n for n in self._procs if n != "slurmctld"] + (["slurmctld"] if "slurmctld" in self._procs else [])
        for name in order:
            self._terminate(self._procs[name])
        self._kill_namespace_leftovers()
        self._procs.clear()
        atexit.unregister(self.stop)

    @staticmethod
    def _terminate(proc: subprocess.Popen, grace: float = 10.0) -> None:
        if proc.poll() is not None:
            return
        try:
            proc.send_signal(signal.SIGTERM)
            proc.wait(timeout=grace)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)
        except ProcessLookupError:
            pass

    def _kill_namespace_leftovers(self) -> None:
        """slurmstepd double-forks away from slurmd; inside our private uts namespaces every
        process is ours, so anything still there is ended."""
        if not self._namespaces:
            return
        for _ in range(2):
            victims = []
            for d in Path("/proc").iterdir():
                if not d.name.isdigit() or int(d.name) == os.getpid():
                    continue
                try:
                    if os.readlink(d / "ns" / "uts") in self._namespaces:
                        victims.append(int(d.name))
                except OSError:
                    continue
            if not victims:
                return
            for pid in victims:
                try:
                    os.kill(pid, signal.SIGKILL)
                except OSError:
                    pass
            time.sleep(0.5)

    # ------------------------------------------------------------------ setup
    def _append_etc_hosts(self) -> None:
        hosts = Path("/etc/hosts")
        text = hosts.read_text()
        have = set()
        for line in text.splitlines():
            parts = line.split("#", 1)[0].split()
            if parts and parts[0] == "127.0.0.1":
                have.update(parts[1:])
        need = [n for n in self.nodes if n not in have]
        if need:
            with hosts.open("a") as f:
                f.write(("" if text.endswith("\n") else "\n") + "127.0.0.1 " + " ".join(need) + "\n")

    def _write_conf(self) -> None:
        s = self.scratch
        self.ctld_host = socket.gethostname().split(".")[0]
        lines = [
            "ClusterName=pytestcluster",
            # Random first job id: job scripts derive ports from it (10000 + id % 50000), and
            # clusters of concurrent test runs on this host should not all start at job 1.
            f"FirstJobId={random.randint(1000, 40000)}",
            f"SlurmctldHost={self.ctld_host}(127.0.0.1)",
            f"SlurmctldPort={self.ctld_port}",
            "AuthType=auth/none",
            "CredType=cred/none",
            # Requeued batch jobs wait cred_expire+1 s (default 120) before they may start again.
            "AuthInfo=cred_expire=5",
            "SlurmUser=root",
            "SlurmdUser=root",
            f"StateSaveLocation={s}/state",
            f"SlurmdSpoolDir={s}/spool/%n",
            f"SlurmctldPidFile={s}/run/slurmctld.pid",
            f"SlurmdPidFile={s}/run/slurmd-%n.pid",
            f"SlurmctldLogFile={s}/log/slurmctld.log",
            f"SlurmdLogFile={s}/log/slurmd-%n.log",
            "SlurmctldDebug=info",
            "SlurmdDebug=info",
            f"TmpFS={s}/nodetmp/%n",
            "ProctrackType=proctrack/linuxproc",
            "TaskPlugin=task/none",
            "SelectType=select/cons_tres",
            "SelectTypeParameters=CR_Core",
            "MpiDefault=none",
            "SchedulerType=sched/backfill",
            "SchedulerParameters=batch_sched_delay=0,sched_min_interval=0,sched_interval=1,bf_interval=1",
            "EnforcePartLimits=ALL",
            "AccountingStorageType=accounting_storage/none",
            "JobCompType=jobcomp/none",
            "JobAcctGatherType=jobacct_gather/none",
            "SlurmdParameters=config_overrides",
            "ReturnToService=2",
            "MinJobAge=300",
            "KillWait=5",
            "InactiveLimit=0",
            "SlurmctldTimeout=60",
            "SlurmdTimeout=120",
            "MessageTimeout=20",
            "GresTypes=gpu",
        ]
        for node, port in zip(self.nodes, self.node_ports):
            lines.append(f"NodeName={node} NodeHostname=localhost NodeAddr=127.0.0.1 Port={port} "
                         f"CPUs={self.cpus_per_node} RealMemory={self.real_memory_mb} State=UNKNOWN")
        lines.append(f"PartitionName=debug Nodes={','.join(self.nodes)} Default=YES MaxTime=INFINITE State=UP")
        self.conf_path.write_text("\n".join(lines) + "\n")
        # Private hosts file for the emulated nodes: node names and the controller resolve locally.
        hosts = "127.0.0.1 localhost " + " ".join(dict.fromkeys([self.ctld_host, *self.nodes])) + "\n"
        (s / "etc" / "hosts").write_text(hosts)

    def _start_daemons(self) -> None:
        conf = str(self.conf_path)
        with open(self.log_dir / "slurmctld.stdout", "wb") as out:
            self._procs["slurmctld"] = subprocess.Popen(
                ["slurmctld", "-D", "-c", "-f", conf], env=self.env, stdout=out, stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL, start_new_session=True, preexec_fn=_die_with_parent)
        self._wait(lambda: subprocess.run(["scontrol", "ping"], env=self.env, capture_output=True, text=True,
                                          timeout=10).stdout.count("UP") > 0, "slurmctld to answer `scontrol ping`")
        hosts = str(self.scratch / "etc" / "hosts")
        for node in self.nodes:
            if self._use_unshare:
                cmd = ["unshare", "--mount", "--uts", "sh", "-c",
                       'mount --bind "$1" /etc/hosts && hostname "$2" && exec slurmd -D -N "$2" -f "$3"',
                       "slurmd-wrapper", hosts, node, conf]
            else:
                cmd = ["slurmd", "-D", "-N", node, "-f", conf]
            with open(self.log_dir / f"slurmd-{node}.stdout", "wb") as out:
                proc = subprocess.Popen(cmd, env=self.env, stdout=out, stderr=subprocess.STDOUT,
                                        stdin=subprocess.DEVNULL, start_new_session=True,
                                        preexec_fn=_die_with_parent)
            self._procs[node] = proc
            if self._use_unshare:
                self._remember_namespace(proc)

    def _remember_namespace(self, proc: subprocess.Popen) -> None:
        host_ns = os.readlink("/proc/self/ns/uts")
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and proc.poll() is None:
            try:
                ns = os.readlink(f"/proc/{proc.pid}/ns/uts")
            except OSError:
                break
            if ns != host_ns:     # unshare has moved itself into the new namespace
                self._namespaces.add(ns)
                return
            time.sleep(0.05)

    def _wait_ready(self) -> None:
        def nodes_idle() -> bool:
            out = subprocess.run(["sinfo", "-h", "-N", "-o", "%N %T"], env=self.env, capture_output=True,
                                 text=True, timeout=10).stdout
            states = dict(line.split()[:2] for line in out.splitlines() if len(line.split()) >= 2)
            return all(states.get(n) == "idle" for n in self.nodes)
        self._wait(nodes_idle, f"nodes {','.join(self.nodes)} to be idle in sinfo")

    def _wait(self, predicate, what: str) -> None:
        deadline = time.monotonic() + self.start_timeout
        while True:
            dead = [n for n, p in self._procs.items() if p.poll() is not None]
            if dead:
                raise SlurmError(f"Slurm daemon(s) {dead} exited while waiting for {what}\n{self.diagnostics()}")
            try:
                if predicate():
                    return
            except (OSError, subprocess.SubprocessError, ValueError):
                pass
            if time.monotonic() > deadline:
                raise SlurmError(f"timed out after {self.start_timeout:.0f}s waiting for {what}\n{self.diagnostics()}")
            time.sleep(0.2)

    def diagnostics(self, lines: int = 30) -> str:
        parts = []
        for name, proc in self._procs.items():
            parts.append(f"{name}: pid {proc.pid}, exit code {proc.poll()}")
        for f in sorted(self.log_dir.glob("*")):
            parts.append(f"--- tail of {f}:\n{_tail(f, lines)}")
        if self._started:
            try:
                parts.append("--- sinfo:\n" + subprocess.run(["sinfo", "-N", "-l"], env=self.env, capture_output=True,
                                                             text=True, timeout=10).stdout)
            except (OSError, subprocess.SubprocessError):
                pass
        return "\n".join(parts)

    # ------------------------------------------------------------------ jobs
    def run(self, cmd: Sequence[str], env: Mapping[str, str] | None = None, timeout: float = 120,
            check: bool = False, cwd: str | os.PathLike | None = None) -> subprocess.CompletedProcess:
        """Run a client command (srun, scontrol, ...) against this cluster."""
        full_env = dict(self.env, **(env or {}))
        r = subprocess.run(list(cmd), env=full_env, capture_output=True, text=True, timeout=timeout, cwd=cwd)
        if check and r.returncode != 0:
            raise SlurmError(f"{' '.join(cmd)} failed ({r.returncode}):\n{r.stdout}\n{r.stderr}")
        return r

    def sbatch(self, script: str | os.PathLike, args: Iterable[str] = (), env: Mapping[str, str] | None = None,
               sbatch_args: Iterable[str] = (), cwd: str | os.PathLike | None = None) -> int:
        """Submit `script args...`; `env` is added to the cluster environment (sbatch exports it all
        to the job); `sbatch_args` go before the script and override its #SBATCH lines."""
        r = self.run(["sbatch", "--parsable", *sbatch_args, str(script), *args], env=env, cwd=cwd, timeout=60)
        if r.returncode != 0:
            raise SlurmError(f"sbatch {script} failed ({r.returncode}): {r.stderr.strip()}")
        return int(r.stdout.strip().split(";")[0])

    def job_info(self, job_id: int) -> dict[str, str]:
        """`scontrol show job -o JOB` as a dict ({} when the job is unknown)."""
        r = self.run(["scontrol", "show", "job", "-o", str(job_id)], timeout=30)
        if r.returncode != 0 or not r.stdout.strip():
            return {}
        return _parse_scontrol(r.stdout.splitlines()[0])

    def job_state(self, job_id: int) -> str:
        """The job's state: squeue while it is queued/running, `scontrol show job` afterwards."""
        r = self.run(["squeue", "-h", "-j", str(job_id), "-o", "%T"], timeout=30)
        state = r.stdout.strip().split("\n")[0].strip() if r.returncode == 0 else ""
        if not state:
            state = self.job_info(job_id).get("JobState", "UNKNOWN")
        return state

    def wait(self, job_id: int, timeout: float = 120, states: Iterable[str] = FINAL_STATES,
             poll: float = 0.5) -> str:
        """Poll until the job's state is one of `states` (default: a final state); returns it.
        Raises TimeoutError (with the job's record) when it does not get there in time."""
        wanted = set(states)
        deadline = time.monotonic() + timeout
        state = "UNKNOWN"
        while time.monotonic() < deadline:
            state = self.job_state(job_id)
            if state in wanted:
                return state
            time.sleep(poll)
        raise TimeoutError(f"job {job_id} still {state} after {timeout:.0f}s: {self.job_info(job_id)}")

    def cancel(self, job_id: int, signal_name: str | None = None, batch: bool = False) -> None:
        cmd = ["scancel"]
        if batch:
            cmd.append("--batch")
        if signal_name:
            cmd.append(f"--signal={signal_name}")
        self.run([*cmd, str(job_id)], check=True)
