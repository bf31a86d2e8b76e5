"""With the `group` setting, files holding jobs and logs are 0660 and folders
0770, owned by that group, whatever the umask (which would drop the group's
write bit)."""

from __future__ import annotations

import grp
import os
import stat
import subprocess
from pathlib import Path

import pytest

from conftest import runjobs_cmd, submit_job, write_config


@pytest.mark.parametrize("db_url", ["sqlite"], indirect=True)
def test_group_setting_gives_group_modes_and_ownership(environ, tmp_path):
    group = grp.getgrgid(os.getgid()).gr_name
    home = tmp_path / "fresh" / "home"           # made by runjobs itself
    config = write_config(tmp_path / "config", f'group = "{group}"\n')
    env = {**environ, "RUNJOBS_HOME": str(home), "RUNJOBS_CONFIG": str(config),
           "RUNJOBS_DATABASE_URL": f"sqlite:///{home / 'runjobs.db'}"}
    job_id = submit_job(env, "sleep", "seconds:=0")
    run = subprocess.run(["sh", "-c", 'umask 022 && exec "$@"', "sh", *runjobs_cmd("run", "--once")],
                         env=env, timeout=60)
    assert run.returncode == 0
    expected = {
        home: 0o770, home / "logs": 0o770, home / "logs" / "jobs": 0o770,
        home / "runjobs.db": 0o660, home / "runjobs.lock": 0o660,
        home / "logs" / "runjobs.log": 0o660, home / "logs" / "jobs" / f"{job_id}.log": 0o660,
    }
    for path, mode in expected.items():
        info = Path(path).stat()
        assert (str(path), stat.S_IMODE(info.st_mode)) == (str(path), mode)
        assert info.st_gid == os.getgid()


def test_unknown_group_is_a_clear_error(environ, tmp_path):
    config = write_config(tmp_path / "config", 'group = "no-such-group-here"\n')
    result = subprocess.run(runjobs_cmd("list"), env={**environ, "RUNJOBS_CONFIG": str(config)},
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 2  # a bad setting is bad input
    assert "group: no such group on this host: 'no-such-group-here'" in result.stderr
