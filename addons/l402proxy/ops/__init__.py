"""Seeing and steering a running paywall: Prometheus metrics (metrics.py), JSON logs
(jsonlog.py), the admin API and page (admin.py). Every door gets them from the engine: each is a
watcher of engine/events.py, and none imports a door."""
