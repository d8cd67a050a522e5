"""Prometheus metrics of the relay, served on ``[metrics] listen`` (off unless configured).

One job per module: ``series`` defines every counter and histogram (the seams that count
import them from there), ``collectors`` reads the gauges at scrape time (queue sizes,
sessions open, sessions refused), ``service`` serves ``/metrics`` with
prometheus-client's Twisted resource.  The series and their labels are listed in
``series`` and in the README.
"""
