"""A real single-node SLURM cluster on localhost for the cluster tests (Debian's slurm-wlm and munge).

The configuration is written into a temporary directory; munged, slurmctld and slurmd run from it
as root (the CI machine's user), and are stopped at the end. `.ci/run` installs the packages.
"""

import os
import shutil
import socket
import subprocess
import time

CONF = """\
ClusterName={name}
SlurmctldHost={host}(127.0.0.1)
SlurmctldPort={ctld_port}
SlurmdPort={slurmd_port}
AuthType=auth/munge
AuthInfo=socket={root}/munge.socket
CredType=cred/munge
SlurmUser=root
SlurmdUser=root
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
MpiDefault=none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
SchedulerType=sched/backfill
ReturnToService=2
StateSaveLocation={root}/{name}-state
SlurmdSpoolDir={root}/{name}-spool
SlurmctldPidFile={root}/{name}-slurmctld.pid
SlurmdPidFile={root}/{name}-slurmd.pid
SlurmctldLogFile={root}/{name}-slurmctld.log
SlurmdLogFile={root}/{name}-slurmd.log
{accounting}
JobCompType=jobcomp/none
KillWait=5
{epilog}
MinJobAge=600
InactiveLimit=0
{node}
PartitionName=debug Nodes={host} Default=YES MaxTime=INFINITE State=UP
"""


# With accounting (Cluster(max_submit_jobs=N)): slurmdbd on a MariaDB server of its own, and slurmctld
# enforcing the association limits, so that sbatch refuses a user's job beyond N pending or running;
# slurmdbd also tells sbatch -M and squeue -M where each cluster's controller is (Cluster.other_cluster)
DBD_CONF = """\
AuthType=auth/munge
AuthInfo=socket={root}/munge.socket
DbdHost=localhost
DbdPort={dbd_port}
SlurmUser=root
StorageType=accounting_storage/mysql
StorageHost=127.0.0.1
StoragePort={db_port}
StorageUser=root
StorageLoc=slurm_acct_db
PidFile={root}/slurmdbd.pid
LogFile={root}/slurmdbd.log
"""
ACCOUNTING = """\
AccountingStorageType=accounting_storage/slurmdbd
AccountingStorageHost=localhost
AccountingStoragePort={dbd_port}
AccountingStoragePass={root}/munge.socket
AccountingStorageEnforce=associations,limits"""


def available(accounting=False):
    tools = ["munged", "slurmctld", "slurmd", "sbatch", "squeue", "scancel"]
    tools += ["slurmdbd", "sacctmgr", "mariadbd", "mariadb-install-db"] if accounting else []
    return all(shutil.which(tool) for tool in tools)


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_for_port(port, log, timeout=60):
    deadline = time.time() + timeout
    while time.time() < deadline:
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.3)
    raise RuntimeError(f"nothing listens on port {port} after {timeout} s; see {log}")


class Cluster:
    """Start with `Cluster(directory).start()`; `env` is the environment the SLURM commands need."""

    def __init__(self, root, name="xlgen", max_submit_jobs=None, epilog_seconds=None):
        """name: the ClusterName; max_submit_jobs: accounting (slurmdbd, which other_cluster needs),
        and this limit for the user; epilog_seconds: an epilog that sleeps so long after each job,
        which squeue shows COMPLETING meanwhile (a real cluster's epilog: cleaning up, health checks)."""
        self.root, self.name = str(root), name
        self.max_submit_jobs, self.epilog_seconds = max_submit_jobs, epilog_seconds
        self.host = socket.gethostname().split(".")[0]
        self.processes = []
        self.env = dict(os.environ, SLURM_CONF=os.path.join(self.root, "slurm.conf"))

    @property
    def accounting(self):
        return self.max_submit_jobs is not None

    def start(self):
        node = subprocess.run(["slurmd", "-C"], capture_output=True, text=True, check=True).stdout.splitlines()[0]
        node += " NodeAddr=127.0.0.1 State=UNKNOWN"
        self.dbd_port = _free_port()
        epilog = ""  # the slurm.conf line
        if self.epilog_seconds:
            script = os.path.join(self.root, "epilog.sh")
            with open(script, "w") as f:
                f.write(f"#!/bin/sh\nsleep {self.epilog_seconds:g}\n")
            os.chmod(script, 0o755)
            epilog = f"Epilog={script}"
        self._write_conf(self.env["SLURM_CONF"], self.name, node, epilog)
        # munge, entirely in the temporary directory: its own key, socket, pid, log and seed files
        subprocess.run(["mungekey", "--create", "--keyfile", os.path.join(self.root, "munge.key")], check=True,
                       capture_output=True)
        os.chmod(self.root, 0o700)  # munged refuses a socket or key directory that others can write to
        subprocess.run(["munged", "--force", f"--socket={self.root}/munge.socket", f"--key-file={self.root}/munge.key",
                        f"--pid-file={self.root}/munged.pid", f"--log-file={self.root}/munged.log",
                        f"--seed-file={self.root}/munged.seed"], check=True, capture_output=True)
        if self.accounting:
            self._start_accounting()
        self._start_controller(self.env, self.name)
        self.processes.append(subprocess.Popen(["slurmd", "-D", "-f", self.env["SLURM_CONF"]], env=self.env,
                                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
        deadline = time.time() + 60
        while time.time() < deadline:
            state = subprocess.run(["sinfo", "-h", "-o", "%T"], env=self.env, capture_output=True, text=True).stdout.strip()
            if state in ("idle", "mixed", "allocated"):
                return self
            time.sleep(0.5)
        self.stop()
        raise RuntimeError(f"the SLURM node did not come up (sinfo says {state!r}); see {self.root}/{self.name}-slurmctld.log")

    def other_cluster(self, name):
        """A second cluster of this site (a multi-cluster site: one slurmdbd, a controller each): its
        own slurmctld, and a node declared FUTURE (never pinged: slurmctld stops in 1-2 s, not 5), so
        nothing runs there. Returns the environment of its login node: there, sbatch and squeue reach
        this cluster's jobs only with -M <self.name>."""
        assert self.accounting, "sbatch -M finds the clusters through slurmdbd: Cluster(max_submit_jobs=N)"
        env = dict(self.env, SLURM_CONF=os.path.join(self.root, f"{name}.conf"))
        self._write_conf(env["SLURM_CONF"], name, f"NodeName={self.host} NodeAddr=127.0.0.1 State=FUTURE", "")
        self._register(name)
        self._start_controller(env, name)
        return env

    def _write_conf(self, path, name, node, epilog):
        for sub in ("state", "spool"):
            os.makedirs(os.path.join(self.root, f"{name}-{sub}"), exist_ok=True)
        accounting = (ACCOUNTING.format(dbd_port=self.dbd_port, root=self.root) if self.accounting
                      else "AccountingStorageType=accounting_storage/none")
        with open(path, "w") as f:
            f.write(CONF.format(name=name, host=self.host, root=self.root, node=node, ctld_port=_free_port(),
                                slurmd_port=_free_port(), accounting=accounting, epilog=epilog))

    def _start_controller(self, env, name):
        self.processes.append(subprocess.Popen(["slurmctld", "-D", "-i", "-f", env["SLURM_CONF"]], env=env,
                                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
        deadline = time.time() + 60
        while subprocess.run(["squeue", "-h"], env=env, capture_output=True).returncode != 0:
            if time.time() > deadline:
                raise RuntimeError(f"slurmctld of {name} does not answer; see {self.root}/{name}-slurmctld.log")
            time.sleep(0.3)

    def _register(self, name):
        subprocess.run(["sacctmgr", "-i", "add", "cluster", name], env=self.env, check=True, capture_output=True)

    def _start_accounting(self):
        """MariaDB (its own data directory and port, no grant tables: a throwaway database), slurmdbd,
        then the cluster, and this user's limit MaxSubmitJobs."""
        db, db_port = os.path.join(self.root, "db"), _free_port()
        subprocess.run(["mariadb-install-db", f"--datadir={db}", "--user=root", "--auth-root-authentication-method=normal"],
                       check=True, capture_output=True)
        self.processes.append(subprocess.Popen(
            ["mariadbd", f"--datadir={db}", "--user=root", f"--port={db_port}", "--bind-address=127.0.0.1",
             f"--socket={self.root}/mysqld.sock", f"--pid-file={self.root}/mysqld.pid", "--skip-grant-tables",
             f"--log-error={self.root}/mysqld.log"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
        _wait_for_port(db_port, f"{self.root}/mysqld.log")
        path = os.path.join(self.root, "slurmdbd.conf")
        with open(path, "w") as f:
            f.write(DBD_CONF.format(root=self.root, dbd_port=self.dbd_port, db_port=db_port))
        os.chmod(path, 0o600)  # slurmdbd refuses a configuration others can read
        self.processes.append(subprocess.Popen(["slurmdbd", "-D"], env=self.env,  # (reads SLURM_CONF's directory)
                                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
        _wait_for_port(self.dbd_port, f"{self.root}/slurmdbd.log")
        # (adding the cluster gives user root an association in account root: the limit goes there)
        self._register(self.name)
        subprocess.run(["sacctmgr", "-i", "modify", "user", "where", "name=root", "set",
                        f"MaxSubmitJobs={self.max_submit_jobs}"], env=self.env, check=True, capture_output=True)

    def jobs(self):
        """{job id: state} of every job slurmctld still knows (MinJobAge keeps finished ones)."""
        out = subprocess.run(["squeue", "-h", "-t", "all", "-o", "%i %T"], env=self.env, capture_output=True,
                             text=True).stdout
        return dict(line.split() for line in out.splitlines())

    def stop(self):
        subprocess.run(["scancel", "--user", "root"], env=self.env, capture_output=True)
        for process in reversed(self.processes):
            process.terminate()
            try:
                process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                process.kill()
        self.processes = []
        subprocess.run(["munged", "--stop", f"--socket={self.root}/munge.socket"], capture_output=True)
