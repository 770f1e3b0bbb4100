"""Two sweep workers share one study through a real PostgreSQL server started here on localhost."""

import glob
import os
import shutil
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

import optuna
import pytest
from optuna.trial import TrialState

from loraq.report import read_csv
from loraq.sweep import SweepConfig, open_storage

REPO = Path(__file__).resolve().parents[1]


def _pg_bin() -> Path:
    found = shutil.which("initdb")
    if found:
        return Path(found).parent
    versions = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"), key=lambda p: int(p.split("/")[-3]))
    return Path(versions[-1]).parent if versions else None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def postgres_url():
    """A throwaway PostgreSQL cluster in a temporary folder (as the postgres user when run as root)."""
    bin_dir = _pg_bin()
    if bin_dir is None:
        pytest.skip("no PostgreSQL binaries (initdb) installed: apt-get install postgresql")
    pytest.importorskip("psycopg", reason="the PostgreSQL driver is missing: pip install 'loraq[postgres]'")
    root = Path(tempfile.mkdtemp(prefix="loraq-pg-"))
    data = root / "data"
    prefix = []
    if os.geteuid() == 0:  # PostgreSQL refuses to run as root
        import pwd

        try:
            user = pwd.getpwnam("postgres")
        except KeyError:
            pytest.skip("running as root and there is no 'postgres' user to run the server as")
        os.chown(root, user.pw_uid, user.pw_gid)
        prefix = ["runuser", "-u", "postgres", "--"]
    port = _free_port()

    def run(*cmd):
        subprocess.run(prefix + list(cmd), check=True, capture_output=True, text=True, cwd=root)

    run(str(bin_dir / "initdb"), "-D", str(data), "-U", "postgres", "--auth=trust", "-E", "UTF8")
    run(str(bin_dir / "pg_ctl"), "-D", str(data), "-l", str(root / "log"), "-w", "-t", "60",
        "-o", f"-p {port} -k {root} -h 127.0.0.1", "start")
    try:
        yield f"postgresql://postgres@127.0.0.1:{port}/postgres"
    finally:
        subprocess.run(prefix + [str(bin_dir / "pg_ctl"), "-D", str(data), "-m", "immediate", "stop"],
                       capture_output=True, cwd=root)
        shutil.rmtree(root, ignore_errors=True)


def test_two_workers_share_one_sweep_through_postgresql(postgres_url, tmp_path):
    argv = ["--hidden", "48", "--limit", "400", "--pretrain-epochs", "2", "--compressions", "int1", "--ranks", "2,4",
            "--inits", "svd", "--trials", "4", "--epochs", "3", "--device", "cpu", "--search-space",
            '{"batch_size": [64]}', "--storage", postgres_url, "--quiet"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    workers = [subprocess.Popen([sys.executable, "-m", "loraq", "sweep", *argv, "--output", str(tmp_path / f"w{i}")],
                                cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
               for i in range(2)]
    results = [w.communicate(timeout=600) for w in workers]
    for w, (out, err) in zip(workers, results):
        assert w.returncode == 0, err[-3000:]

    cfg = SweepConfig(hidden=(48,), limit=400, pretrain_epochs=2, compressions=("int1",), ranks=(2, 4), inits=("svd",),
                      trials=4, epochs=3, device="cpu", search_space={"batch_size": [64]})
    pids = set()
    for cell in cfg.cells():
        study = optuna.load_study(study_name=f"{cfg.prefix()}-{cell.name}", storage=open_storage(postgres_url))
        trials = study.get_trials(deepcopy=False)
        finished = [t for t in trials if t.state in (TrialState.COMPLETE, TrialState.PRUNED)]
        # both workers may start the last missing trial at the same moment: at most one extra
        assert 4 <= len(finished) <= 5, [t.state for t in trials]
        assert not [t for t in trials if t.state in (TrialState.RUNNING, TrialState.FAIL)]
        pids |= {t.user_attrs["pid"] for t in trials}
    assert pids == {w.pid for w in workers}  # the work was shared
    for i in range(2):  # each worker reports the whole sweep, trials run by the other one included
        rows = [r for r in read_csv(tmp_path / f"w{i}" / "evaluation.csv") if r["kind"] == "lora"]
        assert len(rows) == 2 and all(r["test_acc"] and r["best_trial"] for r in rows)
        assert not (tmp_path / f"w{i}" / "optuna.db").exists()
