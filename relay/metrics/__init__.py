"""Prometheus metrics of the relay, served on ``[metrics] listen`` (off unless configured).

One job per module: ``collectors`` reads the gauges at scrape time (queue sizes,
sessions open, sessions refused), ``service`` serves ``/metrics`` with
prometheus-client's Twisted resource.  The counters and histograms are counted
elsewhere, into :mod:`relay.instruments.series` (which every instrumented package can
import because it imports none of them); this package reads the running services and
nothing here is imported by them.  The series and their labels are listed in
:mod:`relay.instruments.series` and in the README.
"""
