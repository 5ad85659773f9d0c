-- Jobs that failed for good, by task: few at any time, read by the maintenance sweep every
-- round (the sync of refunds made outside agentpay whose latest job failed is run again,
-- workers/maintenance.py). Without it that read would scan every job the pruning keeps.
CREATE INDEX procrastinate_jobs_failed_idx ON procrastinate_jobs (task_name)
    WHERE status = 'failed';
