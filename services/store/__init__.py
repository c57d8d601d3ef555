"""The job store of record: API keys, uploaded files, jobs and their events, in SQL.

SQLite by default (WAL mode, so the API reads while a worker writes), PostgreSQL by URL.
Celery's result backend is not used: everything a client sees about a job is read from
here. The package's parts:

- ``models``: the tables, ids and key hashing (statuses: ``services.status``);
- ``database``: ``Store``, one per process and URL, which upgrades the schema on open
  (Alembic, ``services/migrations``), so a database made by an older version keeps working;
- ``crud``: reads and writes that take an open session;
- ``leases``: who runs a job, taken atomically and renewed by heartbeat.

Events are the record of what happened to a job. A job's events are appended under the
job's row lock (PostgreSQL; SQLite has one writer at a time anyway), so their ids grow in
commit order per job and a reader's ``after`` cursor never steps over one still being
committed. After a commit that added events, the store calls its ``notify`` hook with the
job ids (``services.events`` publishes them on Redis, where the API's event streams wait).

Callers use the package namespace (``from services import store``; ``store.get_job``).
"""

from services.status import TERMINAL_STATUSES, JobStatus
from services.store.crud import (
    PUBLIC_JOB_COLUMNS,
    READ_JOB_AS,
    add_event,
    count_jobs_by_status,
    create_api_key,
    create_file,
    create_job,
    events_after,
    find_api_key,
    get_api_key,
    get_file,
    get_job,
    job_status,
    last_event_id,
    list_api_keys,
    list_events,
    list_files,
    list_jobs,
    read_job_as,
    request_cancel,
    revoke_api_key,
)
from services.store.database import (
    FIRST_REVISION,
    MIGRATIONS,
    Store,
    get_store,
    head_revision,
    migrate,
)
from services.store.leases import (
    acquire_lease,
    lease_is_dead,
    pid_alive,
    renew_lease,
    requeue_dead_jobs,
    this_host,
    update_leased_job,
)
from services.store.models import (
    KEY_PREFIX,
    MAX_SEQ,
    ApiKey,
    Base,
    Event,
    File,
    Job,
    hash_key,
    is_id,
    key_problem,
    new_id,
    utcnow,
)

__all__ = [
    "FIRST_REVISION", "KEY_PREFIX", "MAX_SEQ", "MIGRATIONS", "PUBLIC_JOB_COLUMNS",
    "READ_JOB_AS", "TERMINAL_STATUSES", "ApiKey", "Base", "Event", "File", "Job", "JobStatus",
    "Store", "acquire_lease", "add_event", "count_jobs_by_status", "create_api_key",
    "create_file", "create_job", "events_after", "find_api_key", "get_api_key", "get_file",
    "get_job", "get_store", "hash_key", "head_revision", "is_id", "job_status", "key_problem",
    "last_event_id", "lease_is_dead", "list_api_keys", "list_events", "list_files",
    "list_jobs", "migrate", "new_id", "pid_alive", "read_job_as", "renew_lease",
    "request_cancel", "requeue_dead_jobs", "revoke_api_key", "this_host",
    "update_leased_job", "utcnow",
]
