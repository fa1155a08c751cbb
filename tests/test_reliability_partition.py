"""Network partition: a worker in a network namespace of its own, joined to PostgreSQL by a veth
pair, is cut off (ip link set down) while it holds jobs. As with a stall, another worker takes the
jobs over after the lock timeout, and the cut-off worker's late outcomes change nothing. The worker
notices the dead connections (TCP keepalives and user timeout), logs it once, reconnects with
backoff when the link comes back, and carries on.

The server is reached through a small TCP proxy in this process, listening on the veth's address
in the root namespace and forwarding to the suite's server (its unix socket or TCP address). No
traffic goes anywhere but the veth pair and this machine's own sockets."""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import subprocess
import sys
import threading

import pytest
from psycopg import conninfo

from tests.conftest import ROOT, wait_for
from tests.support_jobs import record
from tests.support_reliability import RELIABILITY_ENV, gate_passed, gated, open_gate
from tests.test_reliability_stall import row, starts, stats


def ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True, text=True, timeout=30)


class Namespace:
    def __init__(self):
        n = os.getpid() % 100_000
        self.name, self.host_if, self.ns_if = f"djpart{n}", f"djh{n}", f"djn{n}"
        subnet = f"10.213.{n % 250 + 1}"
        self.host_addr, self.ns_addr = f"{subnet}.1", f"{subnet}.2"

    def create(self) -> None:
        try:
            ip("netns", "add", self.name)
        except FileNotFoundError as exc:
            pytest.skip(f"cannot create a network namespace: {exc}")
        except subprocess.CalledProcessError as exc:
            pytest.skip(f"cannot create a network namespace: 'ip netns add' said: {exc.stderr.strip()}")
        ip("link", "add", self.host_if, "type", "veth", "peer", "name", self.ns_if)
        ip("link", "set", self.ns_if, "netns", self.name)
        ip("addr", "add", f"{self.host_addr}/30", "dev", self.host_if)
        ip("link", "set", self.host_if, "up")
        ip("-n", self.name, "addr", "add", f"{self.ns_addr}/30", "dev", self.ns_if)
        ip("-n", self.name, "link", "set", self.ns_if, "up")
        ip("-n", self.name, "link", "set", "lo", "up")
        # A fixed neighbour entry: with the link down, packets then vanish, as they do behind a
        # broken router, instead of failing fast with "no route to host" once ARP gives up.
        mac = open(f"/sys/class/net/{self.host_if}/address").read().strip()
        ip("-n", self.name, "neigh", "replace", self.host_addr, "lladdr", mac, "dev", self.ns_if, "nud", "permanent")

    def cut(self) -> None:
        ip("link", "set", self.host_if, "down")

    def restore(self) -> None:
        ip("link", "set", self.host_if, "up")

    def destroy(self) -> None:
        for args in (("link", "del", self.host_if), ("netns", "del", self.name)):
            try:
                ip(*args)
            except subprocess.CalledProcessError:
                pass


class Proxy:
    """Forwards TCP connections on (host, an ephemeral port) to the PostgreSQL server of `url`."""

    def __init__(self, host: str, url: str):
        info = conninfo.conninfo_to_dict(url)
        target, port = info.get("host") or "localhost", int(info.get("port") or 5432)
        self.unix = f"{target}/.s.PGSQL.{port}" if target.startswith("/") else None
        self.tcp = None if self.unix else (target, port)
        self.writers: set[asyncio.StreamWriter] = set()
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        self.server = asyncio.run_coroutine_threadsafe(asyncio.start_server(self._serve, host, 0), self.loop).result()
        self.port = self.server.sockets[0].getsockname()[1]

    async def _serve(self, reader, writer) -> None:
        try:
            up_reader, up_writer = await (asyncio.open_unix_connection(self.unix) if self.unix else
                                          asyncio.open_connection(*self.tcp))
        except OSError:
            writer.close()
            return
        self.writers |= {writer, up_writer}
        await asyncio.gather(self._pipe(reader, up_writer), self._pipe(up_reader, writer))

    async def _pipe(self, reader, writer) -> None:
        try:
            while data := await reader.read(65536):
                writer.write(data)
                await writer.drain()
        except (OSError, asyncio.CancelledError):
            pass
        finally:
            writer.close()
            self.writers.discard(writer)

    def close(self) -> None:
        async def stop():
            self.server.close()
            for w in list(self.writers):
                w.close()
            for task in asyncio.all_tasks():
                if task is not asyncio.current_task():
                    task.cancel()

        asyncio.run_coroutine_threadsafe(stop(), self.loop).result(10)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)


class NamespacedWorker(subprocess.Popen):
    """`dj work ARGS` run inside the namespace; its log (stderr) is collected as it comes."""

    def __init__(self, namespace: str, *args: str, env: dict):
        super().__init__(["ip", "netns", "exec", namespace, sys.executable, "-m", "dj", "work", *args],
                         stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, cwd=ROOT,
                         env={**os.environ, **env})
        self.log_lines: list[str] = []
        threading.Thread(target=lambda: self.log_lines.extend(self.stderr), daemon=True).start()

    def log(self) -> str:
        return "".join(self.log_lines)

    def wait_for_log(self, text: str, timeout: float = 30.0) -> None:
        wait_for(lambda: text in self.log(), timeout=timeout, message=f"the namespaced worker to log {text!r}")


@pytest.fixture
def namespace():
    ns = Namespace()
    ns.create()
    try:
        yield ns
    finally:
        ns.destroy()


def test_a_worker_cut_off_loses_its_jobs_notices_reconnects_and_carries_on(conn, db_url, namespace,
                                                                           worker_process, tmp_path):
    gate = str(tmp_path)
    proxy = Proxy(namespace.host_addr, db_url)
    url = conninfo.make_conninfo(db_url, host=namespace.host_addr, port=str(proxy.port))
    a = None
    try:
        x = gated.enqueue("x", gate)  # A's late success must not delete B's claim
        y = gated.enqueue("y", gate, [1, 2])  # A's late failure must not overwrite B's
        open_gate(gate, "y", 2)
        a = NamespacedWorker(namespace.name, "--lock-timeout", "2", "--concurrency", "4", "--queues",
                             "default,only-a", env={**RELIABILITY_ENV, "DJ_DATABASE_URL": url})
        wait_for(lambda: starts(conn) == {("x", 1, a.pid), ("y", 1, a.pid)}, message="A to start both jobs")
        # Cut established connections, not one being opened (that would end at its connect timeout).
        wait_for(lambda: conn.execute("SELECT heartbeat_at > started_at FROM workers WHERE pid = %s",
                                      (a.pid,)).fetchone() == (True,), message="A's heartbeat connection")

        namespace.cut()
        b = worker_process("--lock-timeout", "2", "--concurrency", "2", env=RELIABILITY_ENV)
        b_name = f"{socket.gethostname()}:{b.pid}"
        wait_for(lambda: (row(conn, x)[:2] == (2, b_name) and row(conn, y)[:2] == (2, None)
                          and "y failed in attempt 2" in (row(conn, y)[2] or "")),
                 timeout=30, message="B to reclaim both jobs, fail y and keep running x")
        a.wait_for_log("database connection lost")
        x_before, y_before = row(conn, x), row(conn, y)
        open_gate(gate, "x", 1)
        open_gate(gate, "y", 1)
        wait_for(lambda: gate_passed(gate, "x", 1) and gate_passed(gate, "y", 1),
                 message="A's attempts to end while it is cut off")

        namespace.restore()
        a.wait_for_log("database connection restored")
        record.using(queue="only-a").enqueue_many([(f"a{i}",) for i in range(5)])
        wait_for(lambda: conn.execute("SELECT count(*) FROM test_runs WHERE marker LIKE 'a%%' AND pid = %s",
                                      (a.pid,)).fetchone()[0] == 5,
                 timeout=30, message="A to carry on with new jobs")
        a.send_signal(signal.SIGTERM)
        assert a.wait(30) == 0, a.log()

        log = a.log()
        assert "6 succeeded, 1 failed, 0 dead" in log, "A sent its late outcomes (and ran the 5 new jobs)"
        assert row(conn, x) == x_before, "A's late success did not delete B's claim"
        assert row(conn, y) == y_before, "A's late failure overwrote nothing and counted no attempt"
        assert stats(conn) == (5, 1)
        assert log.count("database connection lost") == 1 and log.count("database connection restored") == 1, log
        assert "Traceback" not in log

        open_gate(gate, "x", 2)
        wait_for(lambda: row(conn, x) is None, message="B to finish x")
        assert stats(conn) == (6, 1)
    finally:
        if a is not None and a.poll() is None:
            a.kill()
            a.wait(10)
        proxy.close()
