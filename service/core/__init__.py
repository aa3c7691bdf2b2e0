"""The job core that the gateway and the workers share: settings, Redis access, ids, job and adapter
records, tenants, the storage layout, the queue, the worker registry and the typed job messages.

It knows neither HTTP (no FastAPI or Starlette) nor the model (no torch): the gateway and the
workers import it, it imports neither of them.
"""
