"""The date lock under skewed clocks, stalls, failing heartbeats, half-written files and runs of several stages.

Leases are judged by the lake's own clock (file mtimes, S3 Last-Modified); these tests run holders and contenders
whose wall clocks are hours off, freeze a real holder process (SIGSTOP) past its lease, and break a holder's
storage writes on purpose."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from matcher.config import load_config
from matcher.io.lake import Lake
from matcher.io.locks import DateLock, DateLockedError, LockLostError, date_lock

D1 = "2026-01-01"
REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(params=["local", pytest.param("s3", marks=pytest.mark.integration)])
def lake(request, tmp_path) -> Lake:
    if request.param == "local":
        return Lake(f"file://{tmp_path}/lake", load_config().storage)
    return Lake(f"s3://lake/locks-{tmp_path.name}", request.getfixturevalue("s3_config").storage)


def _lease(lake: Lake) -> tuple[float, float]:
    """(stale_after, heartbeat_every): S3's Last-Modified has 1 s resolution, a local disk's mtime far finer."""
    return (3.0, 0.3) if lake.uri.startswith("s3") else (1.5, 0.1)


def _lock_names(lake: Lake) -> list[str]:
    folder = Path(lake.root) / Lake.lock_dir(D1)
    return sorted(p.name for p in folder.glob("[0-9]*.json")) if folder.exists() else []


def _skewed(seconds: float):
    return lambda: time.time() + seconds


@pytest.mark.parametrize("holder_skew, contender_skew", [(0, 3600), (0, -3600), (3600, 0), (-3600, 0)])
def test_a_contender_with_a_skewed_clock_does_not_take_a_live_lock(tmp_path, holder_skew, contender_skew):
    lake = Lake(f"file://{tmp_path}/lake", load_config().storage)
    with date_lock(lake, D1, "holder", stale_after=1.0, heartbeat_every=0.1, clock=_skewed(holder_skew)) as held:
        for _ in range(2):  # at once, and after the lease length has passed with the holder renewing it
            with pytest.raises(DateLockedError, match="being run by holder"):
                with date_lock(lake, D1, "contender", stale_after=1.0, heartbeat_every=0.1,
                               clock=_skewed(contender_skew)):
                    pass
            time.sleep(1.5)
        held.assert_held()


@pytest.mark.integration
def test_on_s3_a_skewed_contender_waits_and_a_dead_lock_is_taken_only_after_stale_after(s3_config, tmp_path):
    lake = Lake(f"s3://lake/locks-{tmp_path.name}", s3_config.storage)
    with date_lock(lake, D1, "holder", stale_after=3.0, heartbeat_every=0.3) as held:
        time.sleep(3.5)
        with pytest.raises(DateLockedError, match="being run by holder"):
            with date_lock(lake, D1, "contender", stale_after=3.0, heartbeat_every=0.3, clock=_skewed(3600)):
                pass
        held.assert_held()
    # A holder that died on another host: its file stays, unrenewed.
    lake.write_json(f"{Lake.lock_dir(D1)}/000000000099-dead.json", {"holder": "dead", "host": "elsewhere", "pid": 1})
    with pytest.raises(DateLockedError, match="being run by dead"):
        with date_lock(lake, D1, "contender", stale_after=3.0, heartbeat_every=0.3, clock=_skewed(-3600)):
            pass
    time.sleep(4.2)
    with date_lock(lake, D1, "contender", stale_after=3.0, heartbeat_every=0.3, clock=_skewed(-3600)) as taken:
        assert taken.token > 99  # tokens only grow: past the dead holder's
        assert lake.exists(f"{Lake.revoked_dir(D1)}/000000000099-dead.json")


def test_a_dead_holders_lock_is_taken_only_after_stale_after(tmp_path):
    lake = Lake(f"file://{tmp_path}/lake", load_config().storage)
    lake.write_json(f"{Lake.lock_dir(D1)}/000000000007-dead.json", {"holder": "dead", "host": "elsewhere", "pid": 1})
    started = time.monotonic()
    with pytest.raises(DateLockedError, match="being run by dead"):
        with date_lock(lake, D1, "contender", stale_after=1.0, heartbeat_every=0.1):
            pass
    time.sleep(max(0.0, 1.2 - (time.monotonic() - started)))
    with date_lock(lake, D1, "contender", stale_after=1.0, heartbeat_every=0.1) as taken:
        assert taken.token > 7 and _lock_names(lake) == [Path(taken.name).name]
    assert _lock_names(lake) == []


class FailingWritesLake(Lake):
    """An injected fault: once `broken` is set, every write to the lake fails as an unreachable store does."""
    broken = False

    def write_bytes(self, relpath: str, data: bytes) -> None:
        if self.broken:
            raise OSError("injected: When uploading: AWS Error NETWORK_CONNECTION")
        super().write_bytes(relpath, data)


def _wait_until(condition, seconds: float) -> bool:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.02)
    return condition()


def test_a_holder_whose_heartbeat_fails_stops_and_its_commit_fence_refuses(tmp_path):
    lake = FailingWritesLake(f"file://{tmp_path}/lake", load_config().storage)
    with pytest.raises(LockLostError, match="a heartbeat failed: OSError: injected"):
        with date_lock(lake, D1, "stalling holder", stale_after=3.0, heartbeat_every=0.1) as lock:
            lock.check()
            lock.assert_held()  # healthy: renewed and verified
            lake.broken = True
            assert _wait_until(lambda: lock.lost is not None, 2.0)
            with pytest.raises(LockLostError):
                lock.check()
            with pytest.raises(LockLostError):
                lock.assert_held()  # the fence before a commit point refuses
            # The work "finishes" without looking: leaving the block still raises.
    assert _lock_names(lake) == []  # it gave the date up at once: no one waits for stale_after
    lake.broken = False
    with date_lock(lake, D1, "next run", stale_after=3.0, heartbeat_every=0.1):
        pass


_HOLDER = r"""
import json, sys
from matcher.config import load_config
from matcher.io.lake import Lake
from matcher.io.locks import LockLostError, date_lock
uri, storage, stale_after, heartbeat = sys.argv[1], json.loads(sys.argv[2]), float(sys.argv[3]), float(sys.argv[4])
lake = Lake(uri, load_config(overrides={"storage": storage}).storage)
try:
    with date_lock(lake, "2026-01-01", "frozen holder", stale_after=stale_after, heartbeat_every=heartbeat) as lock:
        print("held", lock.token, flush=True)
        sys.stdin.readline()  # the test freezes this process here, then asks it to commit
        try:
            lock.assert_held()
            print("committed", flush=True)
        except LockLostError as exc:
            print("refused:", exc, flush=True)
except LockLostError as exc:
    print("exit raised LockLostError", flush=True)
"""


@pytest.mark.integration
def test_a_frozen_holder_is_fenced_out_after_another_takes_over(lake, request):
    """A real stall: the holder's process is stopped (SIGSTOP) past its lease; another run takes the date; the
    holder, woken, is refused at its commit fence, and the new holder keeps the date."""
    stale_after, heartbeat = _lease(lake)
    storage = {}
    if lake.uri.startswith("s3"):
        cfg = request.getfixturevalue("s3_config").storage
        storage = {"s3_endpoint": cfg.s3_endpoint, "s3_access_key": cfg.s3_access_key,
                   "s3_secret_key": cfg.s3_secret_key}
    holder = subprocess.Popen([sys.executable, "-c", _HOLDER, lake.uri, json.dumps(storage), str(stale_after),
                               str(heartbeat)], cwd=REPO, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
                              env={**os.environ, "PYTHONPATH": str(REPO)})
    try:
        first = holder.stdout.readline().split()
        assert first[0] == "held", first
        with pytest.raises(DateLockedError, match="being run by frozen holder"):
            with date_lock(lake, D1, "second run", stale_after=stale_after, heartbeat_every=heartbeat):
                pass
        holder.send_signal(signal.SIGSTOP)
        time.sleep(stale_after * 1.4)
        with date_lock(lake, D1, "second run", stale_after=stale_after, heartbeat_every=heartbeat) as second:
            assert second.token > int(first[1])
            holder.send_signal(signal.SIGCONT)
            holder.stdin.write("commit\n")
            holder.stdin.flush()
            answer = holder.stdout.readline()
            assert answer.startswith("refused:") and "took the lock over" in answer, answer
            assert holder.stdout.readline().strip() == "exit raised LockLostError"
            assert holder.wait(timeout=30) == 0
            time.sleep(heartbeat * 3)
            second.assert_held()  # the woken holder neither broke nor shared the new lease
            assert [n.startswith(f"{second.token:012d}-") for n in _lock_names(lake)] in ([True], [])
    finally:
        holder.send_signal(signal.SIGCONT)
        holder.kill()
        holder.wait()


def test_a_half_written_lock_file_is_live_not_absent(tmp_path):
    lake = Lake(f"file://{tmp_path}/lake", load_config().storage)
    half = Path(lake.root) / Lake.lock_dir(D1) / "000000000003-half.json"
    half.parent.mkdir(parents=True)
    half.write_text('{"holder": "some run", "ho')  # a writer caught mid-write (or a torn file)
    with pytest.raises(DateLockedError, match="unreadable lock file .*000000000003-half.json"):
        with date_lock(lake, D1, "contender", stale_after=1.0, heartbeat_every=0.1):
            pass
    then = time.time() - 10
    os.utime(half, (then, then))  # unrenewed for longer than stale_after by the lake's clock: taken over
    with date_lock(lake, D1, "contender", stale_after=1.0, heartbeat_every=0.1):
        assert not half.exists()


def test_a_reader_never_sees_a_renewal_half_written(tmp_path):
    lake = Lake(f"file://{tmp_path}/lake", load_config().storage)
    reads, torn = 0, []
    with date_lock(lake, D1, "holder " + "x" * 20000, stale_after=3.0, heartbeat_every=0.005) as lock:
        path = Path(lake.root) / lock.name
        deadline = time.monotonic() + 1.0
        while time.monotonic() < deadline:
            try:
                json.loads(path.read_bytes())
                reads += 1
            except FileNotFoundError:
                torn.append("absent")
            except ValueError:
                torn.append("unparseable")
        assert lock.lost is None
    assert reads > 50 and torn == []


def test_runs_claim_the_date_between_their_stages(tmp_path):
    """Airflow runs one stage per process: a run's claim keeps another run (or a `matcher run`) out between its
    stages, until its publish ends the claim or the claim expires."""
    lake = Lake(f"file://{tmp_path}/lake", load_config().storage)

    def stage(run_id: str, ttl: float = 3600.0) -> DateLock:
        return DateLock(lake, D1, f"stage of {run_id or 'matcher run'}", stale_after=1.0, heartbeat_every=0.1,
                        run_id=run_id, run_claim_ttl=ttl)

    stage("scheduled__1").acquire().release()  # its clean stage
    for other in ("manual__2", ""):
        with pytest.raises(DateLockedError, match="between the stages of run scheduled__1"):
            stage(other).acquire()
    second = stage("scheduled__1").acquire()  # its next stage
    second.release()
    last = stage("scheduled__1").acquire()  # publish
    last.finish_run()
    last.release()
    stage("manual__2").acquire().release()  # free once published
    time.sleep(0.3)
    stage("", ttl=0.2).acquire().release()  # an abandoned run's claim expires


@pytest.mark.integration
def test_two_runs_of_one_date_cannot_interleave_stages(tmp_path):
    """`matcher run` holds one lock across its stages: one lock file (one token) for the whole run, and a second
    run of the date that keeps trying never gets in, not even between stages."""
    from jobs.context import RunContext
    from jobs.pipeline import run_pipeline
    from matcher.app.demo_catalog import make_demo_catalog

    catalog = make_demo_catalog(tmp_path / "catalog", products=12, with_bad_rows=False)
    cfg = load_config(overrides={"run": {"lake": f"file://{tmp_path}/lake", "catalog": str(catalog)}})
    ctx = RunContext(cfg, D1)
    holders, got_in, done = {}, [], threading.Event()  # lock file name -> its holder

    def second_run() -> None:
        while not _lock_names(ctx.lake) and not done.is_set():  # from when the first run holds the date: before
            time.sleep(0.01)                                     # that, the date is free and taking it is no race
        while not done.is_set():
            for name in set(_lock_names(ctx.lake)) - set(holders):
                try:
                    holders[name] = json.loads((Path(ctx.lake.root) / Lake.lock_dir(D1) / name).read_text())["holder"]
                except (OSError, ValueError):
                    pass  # released meanwhile
            try:
                with date_lock(ctx.lake, D1, "second run"):
                    first = ctx.lock  # the first run's lock: it lets go of `active` before it removes its file
                    if first is not None and first.active:
                        got_in.append(time.monotonic())
            except DateLockedError:
                pass
            time.sleep(0.05)

    contender = threading.Thread(target=second_run)
    contender.start()
    try:
        stats = run_pipeline(ctx, ["clean", "validate"])
    finally:
        done.set()
        contender.join()
    assert stats["clean"]["clean_rows"] == 12 and set(stats) == {"clean", "validate"}
    assert got_in == []
    first_run = [name for name, holder in holders.items() if holder != "second run"]
    assert len(first_run) == 1, holders  # one lock file (one token) for the whole run, not one per stage
    assert holders[first_run[0]] == "matcher run (clean,validate)" and ctx.lock.active is False


def test_a_lock_lost_during_a_permanent_failure_keeps_the_failure_permanent(tmp_path):
    """A failed gate is not retried because the lock was also lost meanwhile; a storage error then is taken for
    the loss showing, and retried."""
    from jobs.context import StageError

    lake = Lake(f"file://{tmp_path}/lake", load_config().storage)
    failed_gate = StageError("validate", "clean_products: 3 expectations failed", retryable=False)
    with pytest.raises(StageError) as err:
        with date_lock(lake, D1, holder="a night") as lock:
            lock._lose("a heartbeat failed")  # the injected fault
            raise failed_gate
    assert err.value is failed_gate
    with pytest.raises(LockLostError):
        with date_lock(lake, D1, holder="a night") as lock:
            lock._lose("a heartbeat failed")
            raise OSError("AWS Error NETWORK_CONNECTION during PutObject")
