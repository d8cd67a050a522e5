"""The counters and histograms the relay's packages count into, and nothing else.

A seam counts where the thing happens (the spool's store and writer, the deliverer's
recorder, the maildrop's pickup, a phone call), so this package must be importable from
all of them: it holds only the series (:mod:`relay.instruments.series`, on
prometheus-client's default registry) and imports nothing of the relay's but two
protocol names of the pure :mod:`relay.policy.dsn`.  Serving them, and the gauges read
from the running services at scrape time, is :mod:`relay.metrics`' job: that side reads
the queue, the queue never reads it.
"""
