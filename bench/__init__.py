"""The benchmark harness behind `agentpay bench`: every figure of issue 7 taken in one run,
on one Postgres, side by side, so that the noise of the machine cancels out in the ratios.

`bench.runner.run()` runs the stages; `bench.report` holds the targets and prints the table.
"""
