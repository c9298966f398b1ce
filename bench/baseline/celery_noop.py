"""The peer baseline for `ud-bench lifecycle`: no-op tasks through Celery
with a RabbitMQ broker and PostgreSQL as the result backend, timed from the
first submission until every result is stored, as the lifecycle benchmark
times UniDesk from the first REST submission until every task is projected
as succeeded.

    python3 celery_noop.py --broker amqp://guest:guest@127.0.0.1:5672// \
        --results postgresql://postgres@127.0.0.1:5432/db --tasks 2000

Prints one line: `celery <tasks> <seconds> <tasks per second>`.
"""

import argparse
import os
import subprocess
import sys
import time

from celery import Celery
import sqlalchemy


def app(broker, results):
    a = Celery("udbaseline", broker=broker, backend="db+" + results)
    a.conf.update(task_ignore_result=False, worker_prefetch_multiplier=4,
                  broker_connection_retry_on_startup=True)

    @a.task(name="noop")
    def noop():
        return None

    return a


def succeeded(engine):
    with engine.connect() as c:
        try:
            return c.execute(sqlalchemy.text(
                "SELECT count(*) FROM celery_taskmeta WHERE status = 'SUCCESS'")).scalar()
        except sqlalchemy.exc.ProgrammingError:
            return 0


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--broker", required=True)
    p.add_argument("--results", required=True, help="postgresql://... for the result backend")
    p.add_argument("--tasks", type=int, default=2000)
    p.add_argument("--concurrency", type=int, default=os.cpu_count() or 2)
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    a = p.parse_args()
    celery = app(a.broker, a.results)
    if a.worker:
        celery.worker_main(["worker", "--loglevel=WARNING", "--pool=prefork",
                            f"--concurrency={a.concurrency}", "--without-gossip",
                            "--without-mingle", "--without-heartbeat"])
        return
    engine = sqlalchemy.create_engine(a.results)
    worker = subprocess.Popen([sys.executable, __file__, "--worker", "--broker", a.broker,
                               "--results", a.results, "--concurrency", str(a.concurrency)])
    try:
        # Warm up: the worker is up and the result table exists once one task came back.
        celery.tasks["noop"].delay().get(timeout=120)
        before = succeeded(engine)
        start = time.monotonic()
        for _ in range(a.tasks):
            celery.tasks["noop"].delay()
        deadline = start + 600
        while succeeded(engine) < before + a.tasks and time.monotonic() < deadline:
            time.sleep(0.05)
        elapsed = time.monotonic() - start
        done = succeeded(engine) - before
        print(f"celery {done} {elapsed:.3f} {done / elapsed:.1f}", flush=True)
    finally:
        worker.terminate()
        worker.wait(timeout=30)


if __name__ == "__main__":
    main()
