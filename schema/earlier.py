"""Earlier texts of migrations that were edited after they were first committed.

A database migrated by the code of such a commit recorded the checksum of the text it ran;
`migrate` (schema/__init__.py) refused it as edited. Each text is listed here by its checksum
with what differs from the text in this release:

- a harmless difference (comments; data a later migration or an operator may see to; a view
  a later migration always defines again): the text is accepted and the migration's checksum
  stamped with this release's;
- a structural one (the database has a different schema than this release's text makes): the
  text is accepted together with a repair migration (`repair`), which brings such a database
  to what the current text makes and changes nothing on one migrated with it. `migrate`
  applies the repair right after the migration it must follow (`REPAIRS`), before the
  migrations after it, which may depend on what it repairs; the checksum is stamped in the
  repair's transaction.

Not here: 0008 was first committed as `0008_stuck_requests` (c95290e) and renamed a minute
later; a database with that name recorded gets `0008_ops_views` (which defines the same view
again, and one more) and ends the same.

Texts from before checksums were kept (0009's first, eb0fb4e) were recorded without one; such a
database is stamped with this release's checksums, with a warning (`_check_unedited`), and the
repair migrations, which look for what only the earlier text made, repair it all the same.

A migration edited again needs its previous text's checksum here (tests/test_migrations.py
keeps the checksum of every text of every migration ever committed and checks both).
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Earlier:
    differs: str
    """What differs from the current text."""
    repair: str | None = None
    """The migration that repairs a database migrated with it (None: nothing to repair)."""


# Repair migrations: the migration each must directly follow when a database needs it.
REPAIRS: dict[str, str] = {
    "0026_repair_earlier_0009_0017_0021": "0021_event_catch_up",
    "0027_repair_earlier_0023": "0023_ops_stuck_and_failures",
}

EARLIER: dict[str, dict[str, Earlier]] = {
    "0009_pending_actions": {
        # eb0fb4e, before checksums were kept (a database of it recorded none).
        "b46f1b78385d39b2ea50777752b826d3e6256f2b72b31d89efddd68cd4b29ed6": Earlier(
            "CHECK (refunds_pending >= 0) on payment_jobs, a trigger function counting by "
            "deltas (could drift), trigger not fired on a change of payment_id",
            repair="0026_repair_earlier_0009_0017_0021",
        ),
    },
    "0014_ops_counts": {
        # e7989d0
        "6ece1cbca8d4aeee21f38c8d0717e10a51b85cfc8b6f644c93ce4519bb028f74": Earlier(
            "one comment line fewer (how long payment steps wait during the backfill)"
        ),
    },
    "0017_customer_owners": {
        # 8dcea6b
        "9956c750ea93d3304b8f3c061fd8e7faa30a08c49445a0e1634807a94440595f": Earlier(
            "comments, and the backfill: Customers bound to the first agent naming them, "
            "operators and revoked agents included, with bound_by `agent:<id>` (same schema; "
            "an operator rebinds one with `agentpay customers bind`)"
        ),
        # 1a253cd
        "6411964c452ce6bbeb7a01acb68706e8f0481a68e76ad322840ab7d289f50180": Earlier(
            "a table customer_owner_changes (owner changes; 0019's operator audit replaced "
            "it): its rows are moved to operator_audit and it is dropped",
            repair="0026_repair_earlier_0009_0017_0021",
        ),
    },
    "0019_operator_audit": {
        # 8ac5bd1
        "e6d65bea039b6f8223b8d0ba86f1e4d383a0ad8874ae7ae2ae42376f37aa475d": Earlier(
            "comments only (the customer.bind / customer.unbind actions not listed)"
        ),
    },
    "0021_event_catch_up": {
        # 92bf250
        "d50c3acec2846537456f94af32f15cd301f237a98a6174da9277f88b198120eb": Earlier(
            "provider_event_cursor.checked_at, since split into asked_at and listed_at",
            repair="0026_repair_earlier_0009_0017_0021",
        ),
    },
    "0022_failures_of_ended_payments": {
        # 40925a2 (the reviewer's 9cfd193 ran it)
        "938964fafb2243693228050729b971d2b8e54c2a5d50f47f23f8d61892c947d0": Earlier(
            "ops_queue_depth's rule for failed catch_up_events, and its comment: 0023, which "
            "every such database applies after it, defines the view again"
        ),
    },
    "0023_ops_stuck_and_failures": {
        # e653bea
        "661af51cd26a05a3d982475f5e29335bf7609cea77b02e7dc5461387453f6d0f": Earlier(
            "no job_failures table, ops_recent_failures as 0005 made it, ops_queue_depth "
            "without the later rules for refund jobs and cancel_unowned_intents",
            repair="0027_repair_earlier_0023",
        ),
        # 094ceb3
        "b96f3b95a207e8a0cc7bde6629c48a29cd18d57f29e1bc4f06fdb8765296d01f": Earlier(
            "ops_queue_depth without the later rules for refund jobs (only those that failed "
            "of the pending refund are left out) and cancel_unowned_intents",
            repair="0027_repair_earlier_0023",
        ),
    },
}
