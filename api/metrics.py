"""Prometheus metrics computed from the job store at scrape time.

Workers run on other machines and come and go, so per-process counters would undercount;
the store of record already holds every number, and any API replica reports the same.
"""

from __future__ import annotations

from collections.abc import Iterator

from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
    SummaryMetricFamily,
)
from prometheus_client.registry import Collector
from sqlalchemy import func, select

from services import store

QUEUE_WAIT_BUCKETS = (0.1, 0.5, 1, 2.5, 5, 10, 30, 60, 300, 900, 3600, 4 * 3600)


class StoreCollector(Collector):
    def __init__(self, db: store.Store):
        self.db = db

    def collect(self) -> Iterator[Metric]:
        Job = store.Job
        with self.db.session() as session:
            counts = store.count_jobs_by_status(session)
            waits = [(started - created).total_seconds() for created, started in
                     session.execute(select(Job.created_at, Job.started_at)
                                     .where(Job.started_at.is_not(None)))]
            step_seconds, steps = session.execute(
                select(func.coalesce(func.sum(Job.step_seconds_total), 0.0),
                       func.coalesce(func.sum(Job.steps_run), 0))).one()
            usage = session.execute(
                select(Job.backend, func.sum(Job.quantum_seconds), func.sum(Job.quantum_circuits),
                       func.sum(Job.quantum_shots), func.sum(Job.quantum_jobs))
                .group_by(Job.backend)).all()

        jobs = GaugeMetricFamily("qpa_jobs", "Jobs by status", labels=["status"])
        for status, count in counts.items():
            jobs.add_metric([status], count)
        yield jobs

        buckets, total = [], 0.0
        for bound in QUEUE_WAIT_BUCKETS:
            buckets.append((str(bound), sum(1 for wait in waits if wait <= bound)))
        buckets.append(("+Inf", len(waits)))
        total = sum(waits)
        yield HistogramMetricFamily("qpa_job_queue_wait_seconds",
                                    "Seconds from job creation to its first start",
                                    buckets=buckets, sum_value=total)

        yield SummaryMetricFamily("qpa_step_seconds", "Wall seconds per training step",
                                  count_value=int(steps), sum_value=float(step_seconds))

        families = {
            "seconds": CounterMetricFamily("qpa_quantum_seconds", "Quantum execution seconds",
                                           labels=["backend"]),
            "circuits": CounterMetricFamily("qpa_quantum_circuits", "Circuits executed",
                                            labels=["backend"]),
            "shots": CounterMetricFamily("qpa_quantum_shots", "Shots executed",
                                         labels=["backend"]),
            "jobs": CounterMetricFamily("qpa_quantum_jobs", "Quantum (primitive) jobs submitted",
                                        labels=["backend"]),
        }
        for backend, seconds, circuits, shots, quantum_jobs in usage:
            families["seconds"].add_metric([backend], float(seconds or 0))
            families["circuits"].add_metric([backend], float(circuits or 0))
            families["shots"].add_metric([backend], float(shots or 0))
            families["jobs"].add_metric([backend], float(quantum_jobs or 0))
        yield from families.values()
