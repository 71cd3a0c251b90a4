"""A real one-node Slurm cluster on localhost for end-to-end launcher tests.

:class:`LocalSlurmCluster` installs Debian's ``slurmctld``, ``slurmd``, ``slurm-client`` and
``munge`` packages when they are missing (root and apt-get needed), starts ``munged``,
``slurmctld`` and ``slurmd`` in the foreground as child processes (no systemd, no init scripts,
no files under /etc/slurm: the configuration lives in a private directory and clients find it
through ``SLURM_CONF``), waits until the node is idle and, on :meth:`stop`, stops exactly the
daemons it started, by PID. A ``munged`` that was already serving is used and left alone.

Use it as a context manager::

    with LocalSlurmCluster(state_dir) as cluster:
        subprocess.run(['srun', '-n2', 'hostname'], env=cluster.env(), timeout=60)
"""
import os
import pwd
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path
from typing import Dict, List, Mapping, Optional, Tuple

import pytest

PACKAGES = ('slurmctld', 'slurmd', 'slurm-client', 'munge')
DAEMON_BINARIES = ('/usr/sbin/slurmctld', '/usr/sbin/slurmd', '/usr/sbin/munged')
CLIENT_COMMANDS = ('srun', 'sbatch', 'squeue', 'scontrol', 'sinfo', 'scancel', 'munge')
PARTITION = 'debug'
MUNGE_KEY = Path('/etc/munge/munge.key')
MUNGE_RUN_DIR = Path('/run/munge')
STOP_TIMEOUT_S = 20.0
START_TIMEOUT_S = 60.0
INSTALL_TIMEOUT_S = 600.0


class SlurmUnavailable(RuntimeError):
    """Slurm cannot be installed or started on this machine; the message says why."""


def _free_ports(count: int) -> List[int]:
    """``count`` distinct ports that are free now (all held open while they are picked)."""
    sockets = [socket.socket() for _ in range(count)]
    try:
        for sock in sockets:
            sock.bind(('127.0.0.1', 0))
        return [sock.getsockname()[1] for sock in sockets]
    finally:
        for sock in sockets:
            sock.close()


def slurm_installed() -> bool:
    """Whether the daemons and client commands are all present."""
    return (all(os.access(path, os.X_OK) for path in DAEMON_BINARIES)
            and all(shutil.which(cmd) for cmd in CLIENT_COMMANDS))


def install_slurm() -> None:
    """Install the Debian Slurm and MUNGE packages (about 15 s with a warm mirror).

    Raises:
        SlurmUnavailable: Not root, no apt-get, or the installation failed.
    """
    if os.geteuid() != 0:
        raise SlurmUnavailable('the Slurm packages are missing and installing them needs root '
                               f'(apt-get install {" ".join(PACKAGES)})')
    if shutil.which('apt-get') is None:
        raise SlurmUnavailable('the Slurm packages are missing and there is no apt-get to '
                               'install them with')
    env = dict(os.environ, DEBIAN_FRONTEND='noninteractive')
    commands = (['apt-get', 'update', '-qq'],
                ['apt-get', 'install', '-y', '-qq', '--no-install-recommends', *PACKAGES])
    for command in commands:
        result = subprocess.run(command, env=env, capture_output=True, text=True,
                                timeout=INSTALL_TIMEOUT_S, stdin=subprocess.DEVNULL)
        if result.returncode != 0:
            raise SlurmUnavailable(f'{" ".join(command)} failed ({result.returncode}):\n'
                                   f'{result.stdout[-2000:]}{result.stderr[-2000:]}')
    if not slurm_installed():
        raise SlurmUnavailable(f'apt-get installed {PACKAGES} but the daemons or client '
                               'commands are still missing')


class LocalSlurmCluster:
    """One controller and one compute node on this machine, partition ``debug``.

    Args:
        state_dir (Path): Private directory for slurm.conf, state, spool and daemon logs.
        install (bool): Install missing packages with apt-get. Defaults to True.
    """

    def __init__(self, state_dir: Path, install: bool = True) -> None:
        self.state_dir = Path(state_dir)
        self.install = install
        self.node_name = socket.gethostname().split('.')[0]
        self.cpus = os.cpu_count() or 1
        self.conf_path = self.state_dir / 'slurm.conf'
        self.log_dir = self.state_dir / 'log'
        self._daemons: List[Tuple[str, subprocess.Popen]] = []

    # -- environment -------------------------------------------------------------------------
    def env(self, base: Optional[Mapping[str, str]] = None) -> Dict[str, str]:
        """The environment in which Slurm commands talk to this cluster."""
        env = dict(os.environ if base is None else base)
        env['SLURM_CONF'] = str(self.conf_path)
        return env

    @property
    def started_pids(self) -> Dict[str, int]:
        """PIDs of the daemons this object started, by name."""
        return {name: proc.pid for name, proc in self._daemons}

    def _run(self, *command: str, timeout: float = 30.0) -> subprocess.CompletedProcess:
        return subprocess.run(command, env=self.env(), capture_output=True, text=True,
                              timeout=timeout, stdin=subprocess.DEVNULL)

    # -- start -------------------------------------------------------------------------------
    def start(self) -> 'LocalSlurmCluster':
        """Install if needed, start munged/slurmctld/slurmd and wait for an idle node.

        Raises:
            SlurmUnavailable: Missing packages that cannot be installed, or not root.
            RuntimeError: A daemon did not come up; the message carries its log.
        """
        if not slurm_installed():
            if not self.install:
                raise SlurmUnavailable(f'the Slurm packages {PACKAGES} are not installed')
            install_slurm()
        if os.geteuid() != 0:
            raise SlurmUnavailable('starting slurmd needs root (it runs job steps as their '
                                   'submitting users)')
        try:
            self._start_munged()
            self._write_config()
            self._spawn('slurmctld', ['/usr/sbin/slurmctld', '-D', '-c', '-f',
                                      str(self.conf_path)])
            self._wait_for(lambda: 'is UP' in self._run('scontrol', 'ping').stdout,
                           'slurmctld to answer scontrol ping')
            self._spawn('slurmd', ['/usr/sbin/slurmd', '-D', '-f', str(self.conf_path)])
            self._wait_for(self._node_idle, f'node {self.node_name} to become idle')
        except BaseException:
            self.stop()
            raise
        return self

    def _munge_works(self) -> bool:
        try:
            encoded = subprocess.run(['munge', '-n'], capture_output=True, timeout=10,
                                     stdin=subprocess.DEVNULL)
            if encoded.returncode != 0:
                return False
            decoded = subprocess.run(['unmunge'], input=encoded.stdout, capture_output=True,
                                     timeout=10)
        except subprocess.TimeoutExpired:
            return False
        return decoded.returncode == 0

    def _start_munged(self) -> None:
        if self._munge_works():
            return  # someone else's munged: use it, never stop it
        munge_user = pwd.getpwnam('munge')
        uid, gid = munge_user.pw_uid, munge_user.pw_gid
        if not MUNGE_KEY.is_file() or MUNGE_KEY.stat().st_size == 0:
            subprocess.run(['mungekey', '--create', f'--keyfile={MUNGE_KEY}'], check=True,
                           timeout=30, capture_output=True)
        # munged refuses keys and directories that others can read or that it does not own.
        for directory, mode in ((MUNGE_KEY.parent, 0o700), (MUNGE_RUN_DIR, 0o755),
                                (Path('/var/lib/munge'), 0o700), (Path('/var/log/munge'), 0o700)):
            directory.mkdir(parents=True, exist_ok=True)
            os.chown(directory, uid, gid)
            os.chmod(directory, mode)
        os.chown(MUNGE_KEY, uid, gid)
        os.chmod(MUNGE_KEY, 0o600)
        self._spawn('munged', ['/usr/sbin/munged', '--foreground'], user=uid, group=gid)
        self._wait_for(self._munge_works, 'munged to answer munge -n | unmunge')

    def _write_config(self) -> None:
        if self.state_dir.exists():
            shutil.rmtree(self.state_dir)
        for sub in ('state', 'spool', 'log'):
            (self.state_dir / sub).mkdir(parents=True)
        # Private ports, so that a cluster that is already running on this machine (on the
        # default 6817/6818) does not get in the way.
        ctld_port, slurmd_port = _free_ports(2)
        self.conf_path.write_text('\n'.join((
            'ClusterName=mmsparsevit-ci',
            f'SlurmctldHost={self.node_name}(127.0.0.1)',
            'SlurmUser=root',
            'SlurmdUser=root',
            f'SlurmctldPort={ctld_port}',
            f'SlurmdPort={slurmd_port}',
            'AuthType=auth/munge',
            'CredType=cred/munge',
            f'StateSaveLocation={self.state_dir / "state"}',
            f'SlurmdSpoolDir={self.state_dir / "spool"}',
            f'SlurmctldPidFile={self.state_dir / "slurmctld.pid"}',
            f'SlurmdPidFile={self.state_dir / "slurmd.pid"}',
            f'SlurmctldLogFile={self.log_dir / "slurmctld.log"}',
            f'SlurmdLogFile={self.log_dir / "slurmd.log"}',
            'SlurmctldDebug=info',
            'SlurmdDebug=info',
            'MailProg=/bin/true',
            'ProctrackType=proctrack/linuxproc',
            'TaskPlugin=task/none',
            'JobAcctGatherType=jobacct_gather/none',
            'AccountingStorageType=accounting_storage/none',
            'JobCompType=jobcomp/none',
            'MpiDefault=none',
            'SchedulerType=sched/backfill',
            'SelectType=select/cons_tres',
            'SelectTypeParameters=CR_Core',
            'ReturnToService=2',
            f'NodeName={self.node_name} NodeAddr=127.0.0.1 CPUs={self.cpus} State=UNKNOWN',
            f'PartitionName={PARTITION} Nodes=ALL Default=YES MaxTime=INFINITE State=UP',
            '')))

    def _spawn(self, name: str, command: List[str], user: Optional[int] = None,
               group: Optional[int] = None) -> None:
        self.log_dir.mkdir(parents=True, exist_ok=True)
        with open(self.log_dir / f'{name}.out', 'ab') as output:
            proc = subprocess.Popen(command, env=self.env(), stdin=subprocess.DEVNULL,
                                    stdout=output, stderr=subprocess.STDOUT, user=user,
                                    group=group, extra_groups=[] if user is not None else None,
                                    start_new_session=True)
        self._daemons.append((name, proc))

    def _node_idle(self) -> bool:
        result = self._run('sinfo', '-h', '-n', self.node_name, '-o', '%T')
        return result.stdout.strip() == 'idle'

    def _wait_for(self, condition, what: str) -> None:
        deadline = time.monotonic() + START_TIMEOUT_S
        while time.monotonic() < deadline:
            for name, proc in self._daemons:
                if proc.poll() is not None:
                    raise RuntimeError(f'{name} exited with {proc.returncode} while waiting for '
                                       f'{what}:\n{self.logs()}')
            if condition():
                return
            time.sleep(0.2)
        raise RuntimeError(f'timed out after {START_TIMEOUT_S:.0f} s waiting for {what}:\n'
                           f'{self.logs()}')

    # -- use ---------------------------------------------------------------------------------
    def job_state(self, job_id: str) -> Dict[str, str]:
        """``scontrol show job`` fields of ``job_id`` (e.g. JobState, ExitCode, NumTasks)."""
        text = self._run('scontrol', '-o', 'show', 'job', job_id).stdout
        return dict(field.split('=', 1) for field in text.split() if '=' in field)

    def logs(self, tail_lines: int = 40) -> str:
        """The last lines of every daemon log, for failure messages."""
        parts = []
        for path in sorted(self.log_dir.glob('*')):
            lines = path.read_text(errors='replace').splitlines()[-tail_lines:]
            parts.append(f'--- {path} ---\n' + '\n'.join(lines))
        return '\n'.join(parts)

    # -- stop --------------------------------------------------------------------------------
    def stop(self) -> None:
        """Cancel leftover jobs, then stop the daemons this object started, newest first."""
        if any(name == 'slurmctld' and proc.poll() is None for name, proc in self._daemons):
            # Job steps run under slurmstepd, which outlives slurmd: cancel them first.
            try:
                self._run('scancel', '--full', '--partition', PARTITION, timeout=15)
            except subprocess.TimeoutExpired:
                pass
        while self._daemons:
            name, proc = self._daemons.pop()
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
                try:
                    proc.wait(timeout=STOP_TIMEOUT_S)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait(timeout=STOP_TIMEOUT_S)

    def __enter__(self) -> 'LocalSlurmCluster':
        return self.start()

    def __exit__(self, *exc_info) -> None:
        self.stop()


def start_cluster_or_skip(state_dir: Path) -> LocalSlurmCluster:
    """Start a cluster; skip where Slurm cannot run here, except on CI, where it must."""
    cluster = LocalSlurmCluster(state_dir)
    try:
        return cluster.start()
    except SlurmUnavailable as err:
        if os.environ.get('CI', '').lower() in ('1', 'true', 'yes'):
            pytest.fail(f'CI must run the Slurm tests, but Slurm is unavailable: {err}')
        pytest.skip(f'Slurm packages cannot be installed or started here: {err}')
