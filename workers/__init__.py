"""Everything that starts or supervises a process: the CLI, role workers, the dev stack."""
