"""The Slurm harness says why it cannot run, and skips only off CI."""
import os

import pytest
import slurm_harness
from slurm_harness import LocalSlurmCluster, SlurmUnavailable, install_slurm, start_cluster_or_skip


def test_install_without_root_says_so(monkeypatch):
    monkeypatch.setattr(os, 'geteuid', lambda: 1000)
    with pytest.raises(SlurmUnavailable, match='needs root'):
        install_slurm()


def test_missing_packages_without_install_are_named(monkeypatch, tmp_path):
    monkeypatch.setattr(slurm_harness, 'slurm_installed', lambda: False)
    with pytest.raises(SlurmUnavailable, match='slurmctld.*munge'):
        LocalSlurmCluster(tmp_path, install=False).start()


@pytest.fixture
def unavailable(monkeypatch):
    def refuse(self):
        raise SlurmUnavailable('installing them needs root')

    monkeypatch.setattr(LocalSlurmCluster, 'start', refuse)


def test_skipped_with_the_reason_off_ci(unavailable, monkeypatch, tmp_path):
    monkeypatch.delenv('CI', raising=False)
    with pytest.raises(pytest.skip.Exception, match='needs root'):
        start_cluster_or_skip(tmp_path)


def test_fails_on_ci(unavailable, monkeypatch, tmp_path):
    monkeypatch.setenv('CI', 'true')
    with pytest.raises(pytest.fail.Exception, match='CI must run the Slurm tests.*needs root'):
        start_cluster_or_skip(tmp_path)
