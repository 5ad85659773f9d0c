"""The domain: settings, database, the procrastinate App, the state machine, money, the
provider, and one module per role."""
