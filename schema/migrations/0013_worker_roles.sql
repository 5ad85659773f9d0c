-- Which role each registered worker process runs, and where (procrastinate's own table has
-- only an id and a heartbeat; a worker's queues could only be told from the jobs it held,
-- so an idle worker had none, and a role with no live worker could not be seen). Written by
-- the worker right after procrastinate registers it; goes with its row.

CREATE TABLE worker_roles (
    worker_id bigint PRIMARY KEY REFERENCES procrastinate_workers (id) ON DELETE CASCADE,
    role      text NOT NULL,
    pid       integer NOT NULL,
    host      text NOT NULL
);

-- The same view, with the role, pid and host of each worker (NULL for a worker of an older
-- release, which does not write them); `queues` is its role when known.
CREATE OR REPLACE VIEW ops_workers AS
SELECT w.id AS worker_id,
       w.last_heartbeat,
       extract(epoch FROM now() - w.last_heartbeat)::double precision AS heartbeat_age_seconds,
       count(j.id)::bigint AS running,
       coalesce(min(r.role), string_agg(DISTINCT j.queue_name, ','), '') AS queues,
       min(r.role) AS role,
       min(r.pid) AS pid,
       min(r.host) AS host
  FROM procrastinate_workers w
  LEFT JOIN worker_roles r ON r.worker_id = w.id
  LEFT JOIN procrastinate_jobs j ON j.worker_id = w.id AND j.status = 'doing'
 GROUP BY w.id
 ORDER BY w.id;
